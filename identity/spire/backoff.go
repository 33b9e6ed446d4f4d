package spire

import (
	"math/rand/v2"
	"time"
)

// backoff is exponential with jitter: after the first failure it waits
// about min, doubling up to max, each wait drawn from [d/2, d] so that the
// streams of many pods do not reconnect in lock-step after an agent restart.
type backoff struct {
	min, max time.Duration
	cur      time.Duration
}

func (b *backoff) next() time.Duration {
	switch {
	case b.cur == 0:
		b.cur = b.min
	case b.cur < b.max:
		b.cur = min(2*b.cur, b.max)
	}
	half := b.cur / 2
	return half + rand.N(b.cur-half+1)
}

func (b *backoff) reset() { b.cur = 0 }
