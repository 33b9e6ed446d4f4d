// Package spiretest is a test helper (in tests/spire) that runs a real SPIRE
// server and real SPIRE agents from the binaries in $BULKHEAD_SPIRE_BIN
// (`make spire` builds them): a sqlite datastore and join-token node
// attestation on loopback, agents with the unix workload attestor and the
// admin socket that serves the Delegated Identity API, and registration
// entries managed through the server CLI as an operator would. Every process
// and folder is removed with t.Cleanup, and the server's and agents' logs
// are written to the test log when the test failed. Only tests import it.
//
// The package is named spiretest, not spire, so that a test can import it
// next to identity/spire.
package spiretest
