// Package spire is the SVID source that follows a SPIRE agent's Delegated
// Identity API on its admin socket: one stream per local pod, asked by the
// pod's process (SPIRE attests the PID) or by the Kubernetes selectors the
// node agent has attested itself, and one stream for the trust bundles. It
// reconnects with backoff, turns SPIRE's answers into identity.SVIDUpdate,
// and guards PID subscriptions against PID reuse with a pidfd.
package spire
