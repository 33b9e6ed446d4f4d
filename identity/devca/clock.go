package devca

import "time"

// Clock is the time the CA and the source see. It is injectable so that
// tests can step through SVID lifetimes and rotations without sleeping.
type Clock interface {
	Now() time.Time
	// AfterFunc calls f in its own goroutine after d and returns a stop
	// function with the semantics of (*time.Timer).Stop.
	AfterFunc(d time.Duration, f func()) (stop func() bool)
}

// realClock is the wall clock.
type realClock struct{}

func (realClock) Now() time.Time { return time.Now() }

func (realClock) AfterFunc(d time.Duration, f func()) func() bool {
	return time.AfterFunc(d, f).Stop
}
