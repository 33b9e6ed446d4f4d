// Package runtime owns the system monitor: the syscall hooks of
// bpf/sysmon.c, their loading and attaching, the kernel feature probes they
// depend on, the tracefs mount that tracepoints need, the in-kernel filter of
// watched network namespaces, and the reader that turns ring-buffer records
// into detect.Events. It decides nothing about what an event means: that is
// the pure-Go package runtime/detect.
//
// Tracepoints only observe. Every hook runs at syscall entry, so an event
// says a process asked for something, not that the kernel granted it.
package runtime
