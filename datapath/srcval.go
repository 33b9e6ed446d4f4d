package datapath

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"

	"github.com/cilium/ebpf"

	"github.com/bulkhead-io/bulkhead/policy"
)

// EPAddrs is an endpoint's entry in endpoint_addrs: the addresses and MAC
// the pod may send from (bpf/lib/srcval.h).
type EPAddrs = segmentEpAddrs

// Limits of one endpoint_addrs entry (EP_MAX_V4, EP_MAX_V6).
const (
	maxEndpointV4 = len(EPAddrs{}.V4)
	maxEndpointV6 = len(EPAddrs{}.V6)
	maxEndpointLL = len(EPAddrs{}.Ll)
)

// ErrNoSourceAddrs is returned by Attach for an endpoint without a MAC or
// without an address: the programs would drop everything the pod sends.
var ErrNoSourceAddrs = errors.New("endpoint has no MAC or no address to send from")

// encodeAddrs builds ep's endpoint_addrs entry. Source validation drops
// every frame whose source is not here, so an endpoint must name its MAC
// and at least one address; duplicates are written once.
func encodeAddrs(ep Endpoint) (EPAddrs, error) {
	var v EPAddrs
	if len(ep.MAC) != 6 || [6]byte(ep.MAC) == ([6]byte{}) || len(ep.Addrs) == 0 {
		return v, fmt.Errorf("endpoint %d (MAC %q, %d addresses): %w", ep.ID, ep.MAC, len(ep.Addrs), ErrNoSourceAddrs)
	}
	if ep.MAC[0]&1 != 0 {
		return v, fmt.Errorf("endpoint %d: MAC %s is a multicast address", ep.ID, ep.MAC)
	}
	copy(v.Mac[:], ep.MAC)
	seen := map[netip.Addr]bool{}
	for _, a := range ep.Addrs {
		a = a.Unmap()
		switch {
		case !a.IsValid() || a.IsUnspecified() || a.IsMulticast() || a.Zone() != "":
			return v, fmt.Errorf("endpoint %d: %v is not an address a pod sends from", ep.ID, a)
		case seen[a]:
			continue
		case a.Is4():
			if int(v.N4) == maxEndpointV4 {
				return v, fmt.Errorf("endpoint %d: more than %d IPv4 addresses", ep.ID, maxEndpointV4)
			}
			b := a.As4()
			v.V4[v.N4] = binary.NativeEndian.Uint32(b[:])
			v.N4++
		default:
			if int(v.N6) == maxEndpointV6 {
				return v, fmt.Errorf("endpoint %d: more than %d IPv6 addresses", ep.ID, maxEndpointV6)
			}
			b := a.As16()
			for i := range 4 {
				v.V6[v.N6][i] = binary.NativeEndian.Uint32(b[4*i:])
			}
			v.N6++
		}
		seen[a] = true
	}
	for _, a := range ep.LinkLocal {
		if !a.Is6() || a.Is4In6() || !a.IsLinkLocalUnicast() {
			return v, fmt.Errorf("endpoint %d: %v is not an IPv6 link-local address", ep.ID, a)
		}
		// The zone names the pod's interface, which the slot is for.
		a = a.WithZone("")
		if seen[a] {
			continue
		}
		if int(v.Nll) == maxEndpointLL {
			return v, fmt.Errorf("endpoint %d: more than %d IPv6 link-local addresses", ep.ID, maxEndpointLL)
		}
		b := a.As16()
		for i := range 4 {
			v.Ll[v.Nll][i] = binary.NativeEndian.Uint32(b[4*i:])
		}
		v.Nll++
		seen[a] = true
	}
	return v, nil
}

// setAddrs writes endpoint id's source addresses. Attach writes them before
// the programs can see the endpoint; a rewrite of a live endpoint (the
// agent re-attaching after a restart) writes the same bytes.
func (d *Datapath) setAddrs(id policy.EndpointID, v EPAddrs) error {
	if err := d.objs.EndpointAddrs.Update(uint32(id), &v, ebpf.UpdateAny); err != nil {
		return fmt.Errorf("write source addresses of endpoint %d: %w", id, err)
	}
	return nil
}

// clearAddrs empties endpoint id's slot: an endpoint ID that is attributed
// again without new addresses sends nothing.
func (d *Datapath) clearAddrs(id policy.EndpointID) error {
	if id == 0 || uint32(id) >= d.objs.EndpointAddrs.MaxEntries() {
		return nil
	}
	return d.setAddrs(id, EPAddrs{})
}

// EndpointAddrs reads the addresses and MAC the programs let endpoint id
// send from (none for an endpoint that is not attached).
func (d *Datapath) EndpointAddrs(id policy.EndpointID) (net.HardwareAddr, []netip.Addr, error) {
	var v EPAddrs
	if err := d.objs.EndpointAddrs.Lookup(uint32(id), &v); err != nil {
		return nil, nil, fmt.Errorf("read source addresses of endpoint %d: %w", id, err)
	}
	var addrs []netip.Addr
	for i := range int(min(v.N4, uint8(maxEndpointV4))) {
		var b [4]byte
		binary.NativeEndian.PutUint32(b[:], v.V4[i])
		addrs = append(addrs, netip.AddrFrom4(b))
	}
	for i := range int(min(v.N6, uint8(maxEndpointV6))) {
		var b [16]byte
		for j := range 4 {
			binary.NativeEndian.PutUint32(b[4*j:], v.V6[i][j])
		}
		addrs = append(addrs, netip.AddrFrom16(b))
	}
	if v.Mac == ([6]byte{}) {
		return nil, addrs, nil
	}
	return net.HardwareAddr(v.Mac[:]), addrs, nil
}
