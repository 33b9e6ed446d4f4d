// Package agent is the Bulkhead node daemon. It owns the endpoint manager
// (endpoints arrive from bulkhead-cni over the agent API), the store watcher,
// the reconcile loop that compiles policy and applies the difference to the
// datapath, restart safety (pinned datapath, persisted endpoint records), and
// the flow pipeline (ring buffer → enriched records → log, stream, metrics).
//
// Concurrency: every change to endpoints or to the store goes through one
// batcher (agent/batch). Its goroutine owns the compiler and the datapath
// writes; concurrent CNI ADDs queue while an apply runs and are compiled and
// applied together, and each returns once the apply containing it is live.
// Readers (the API, the flow pipeline) see immutable snapshots published
// after each apply, so they never wait for a compile.
package agent
