// Command bulkhead is the Bulkhead CLI.
package main

import (
	"fmt"
	"os"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "demo" {
		fmt.Println("bulkhead demo: not yet (the demo issue builds it)")
		return
	}
	fmt.Fprintln(os.Stderr, "usage: bulkhead demo")
	os.Exit(2)
}
