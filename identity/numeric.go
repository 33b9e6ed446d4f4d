package identity

import "fmt"

// NumericID is the node-local number of an identity. The datapath carries it
// in the ipcache, the per-endpoint configuration and the policy keys.
type NumericID uint32

// Reserved numeric identities. They never change, because they are written
// into pinned maps that survive agent restarts.
const (
	// IDNone means "no identity". In a policy key it is the wildcard peer.
	IDNone NumericID = 0
	// IDHost is this node: its own addresses, and so kubelet probes.
	IDHost NumericID = 1
	// IDWorld is anything the ipcache does not know.
	IDWorld NumericID = 2

	// MinWorkloadID is the first ID handed to workload label sets.
	MinWorkloadID NumericID = 256
	// MaxWorkloadID is the last ID handed to workload label sets.
	MaxWorkloadID NumericID = 1<<24 - 1
	// MinCIDRID is the first ID handed to CIDR identities (ipBlock peers).
	MinCIDRID NumericID = 1 << 24
)

// IsReserved reports whether id is one of the fixed, reserved identities.
func (id NumericID) IsReserved() bool { return id < MinWorkloadID }

// IsCIDR reports whether id was allocated for a CIDR (ipBlock) peer.
func (id NumericID) IsCIDR() bool { return id >= MinCIDRID }

func (id NumericID) String() string {
	switch id {
	case IDNone:
		return "none"
	case IDHost:
		return "host"
	case IDWorld:
		return "world"
	}
	return fmt.Sprintf("%d", uint32(id))
}
