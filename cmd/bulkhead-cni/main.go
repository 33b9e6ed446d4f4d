// Command bulkhead-cni is the chained CNI plugin (type "bulkhead-cni"). All
// logic lives in package cni; main only hands the CNI commands to skel.
package main

import (
	"github.com/containernetworking/cni/pkg/skel"

	"github.com/bulkhead-io/bulkhead/cni"
)

func main() {
	skel.PluginMainFuncs(cni.New(cni.Options{}).Funcs(), cni.PluginInfo(), cni.About)
}
