package datapath

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"

	"github.com/bulkhead-io/bulkhead/identity"
	"github.com/bulkhead-io/bulkhead/policy"
)

// Forget removes everything the datapath holds for ep's host veth, whether
// or not the veth still exists: its TCX link pins (a link whose device is
// gone is already detached, only the pin remains), its cls_bpf filters when
// the device exists, and its endpoints-map entry. ep.Ifindex is required:
// a veth that is gone has no name to resolve. Forgetting twice is fine.
func (d *Datapath) Forget(ep Endpoint) error {
	if ep.Ifindex <= 0 {
		return errors.New("forget: ifindex required")
	}
	err := inNetns(ep.Netns, func() error {
		nsID, err := netnsID()
		if err != nil {
			return err
		}
		// Filters are deleted only from the device the endpoint had: the
		// ifindex may name another device by now.
		l, err := netlink.LinkByIndex(ep.Ifindex)
		ours := err == nil && (ep.Ifname == "" || l.Attrs().Name == ep.Ifname)
		leaving := 0 // the ifindex may be another endpoint's by now
		if ours {
			leaving = ep.Ifindex
		}
		return errors.Join(d.detachIfindex(nsID, ep.Ifindex, ours), d.sweepBridges(nsID, leaving))
	})
	if err == nil {
		err = d.clearAddrs(ep.ID)
	}
	if err == nil {
		err = d.flushEndpointFlows(ep.ID)
	}
	if err == nil {
		err = d.clearQuarantine(ep.ID)
	}
	if err != nil {
		return fmt.Errorf("forget endpoint %d on ifindex %d: %w", ep.ID, ep.Ifindex, err)
	}
	return nil
}

// Attached reports whether both programs are attached to ep's host veth
// (TCX links pinned and live on that device, or our cls_bpf filters) and
// the endpoints map attributes the device to ep.ID.
func (d *Datapath) Attached(ep Endpoint) (bool, error) {
	var ok bool
	err := inNetns(ep.Netns, func() error {
		l, err := resolveLink(ep)
		if err != nil {
			return err
		}
		ifindex := l.Attrs().Index
		if id, err := d.endpointOf(ifindex); err != nil || id != ep.ID {
			return err
		}
		nsID, err := netnsID()
		if err != nil {
			return err
		}
		for _, h := range hooks() {
			live, err := tcxLive(d.linkPin(nsID, ifindex, h), ifindex)
			if err != nil {
				return err
			}
			if !live {
				live, err = clsactLive(l, h)
				if err != nil {
					return err
				}
			}
			if !live {
				return nil
			}
		}
		ok = true
		return nil
	})
	return ok, err
}

func tcxLive(pin string, ifindex int) (bool, error) {
	l, err := link.LoadPinnedLink(pin, nil)
	if errors.Is(err, os.ErrNotExist) {
		return false, nil
	}
	if err != nil {
		return false, fmt.Errorf("open link pin %s: %w", pin, err)
	}
	defer l.Close()
	info, err := l.Info()
	if err != nil {
		return false, fmt.Errorf("link info %s: %w", pin, err)
	}
	tcx := info.TCX()
	return tcx != nil && int(tcx.Ifindex) == ifindex, nil
}

func clsactLive(l netlink.Link, h hook) (bool, error) {
	filters, err := netlink.FilterList(l, h.parent)
	if err != nil {
		if errors.Is(err, syscall.EINVAL) {
			return false, nil // no clsact qdisc
		}
		return false, fmt.Errorf("list filters: %w", err)
	}
	for _, f := range filters {
		if bf, ok := f.(*netlink.BpfFilter); ok && bf.Name == clsactFilterName {
			return true, nil
		}
	}
	return false, nil
}

// EndpointIdentity reads the identity the live generation gives endpoint id.
func (d *Datapath) EndpointIdentity(id policy.EndpointID) (identity.NumericID, error) {
	d.unmapMu.RLock()
	defer d.unmapMu.RUnlock()
	if d.epcfg == nil {
		return 0, errClosed
	}
	if err := d.epcfg.check(id); err != nil {
		return 0, err
	}
	cfg, ok := d.epcfg.load(d.liveGenUnlocked(), id)
	if !ok {
		return 0, fmt.Errorf("read endpoint %d config: %w", id, ebpf.ErrKeyNotExist)
	}
	return identity.NumericID(cfg.Identity), nil
}

// endpointOf reads which endpoint the programs attribute ifindex to (0:
// none), from the array or the hash, as setEndpoint wrote it.
func (d *Datapath) endpointOf(ifindex int) (policy.EndpointID, error) {
	var id uint32
	var err error
	if ifindex < endpointsArraySize {
		err = d.objs.EndpointsArray.Lookup(uint32(ifindex), &id)
	} else {
		err = d.objs.Endpoints.Lookup(uint32(ifindex), &id)
		if errors.Is(err, ebpf.ErrKeyNotExist) {
			return 0, nil
		}
	}
	if err != nil {
		return 0, fmt.Errorf("read endpoint of ifindex %d: %w", ifindex, err)
	}
	return policy.EndpointID(id), nil
}
