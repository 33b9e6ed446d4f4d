// Command bulkhead is the Bulkhead CLI. It only wires flags to the packages
// that do the work.
package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/bulkhead-io/bulkhead/policy/explain"
)

func main() {
	if err := newRoot().Execute(); err != nil {
		if !errors.Is(err, explain.ErrInvalidStore) {
			fmt.Fprintln(os.Stderr, "bulkhead:", err)
		}
		os.Exit(1)
	}
}
