// Package tunnel owns the node's mTLS tunnel endpoint: the transparent
// listener that accepts enrolled pods' redirected TCP connections, the pool
// of HBONE connections (HTTP/2 CONNECT over mutual TLS 1.3, with each source
// pod's own SVID) to other nodes' endpoints, and the HBONE listener that
// takes connections from nodes' addresses only (never from pods, which
// would bypass their own egress policy through it), verifies the client
// SVID, asks the agent's policy with the verified
// identity, and connects to the local destination pod from a socket the
// datapath knows as tunnel-delivered.
//
// It knows the agent only through the Directory, Identities and Datapath
// interfaces, so it imports neither the agent nor the datapath.
package tunnel
