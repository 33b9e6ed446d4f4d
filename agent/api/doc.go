// Package api is the versioned contract between bulkhead-agent and its
// clients (the bulkhead-cni plugin and the bulkhead CLI): HTTP/JSON over a
// unix socket. It owns the request and response types, the structured error
// codes, a small client, and a handler that routes requests to a Backend the
// agent implements.
//
// It imports only the standard library, because the CNI plugin binary links
// it and must start fast and stay small.
package api
