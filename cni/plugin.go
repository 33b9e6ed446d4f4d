package cni

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/bulkhead-io/bulkhead/agent/api"
)

const (
	// requestTimeout bounds one agent call. ADD waits for attach and a
	// policy apply on the agent side, which is far below this.
	requestTimeout = 10 * time.Second
	// delTimeout is short: DEL succeeds anyway when the agent is slow or
	// down, and a runtime tearing down pods should not wait on it.
	delTimeout = 5 * time.Second
	// Backoff between ADD attempts while the agent is not there yet.
	firstBackoff = 50 * time.Millisecond
	maxBackoff   = time.Second
)

// Options are the plugin's dependencies. The zero value is what the
// binary uses.
type Options struct {
	// Stdout receives the CNI result; os.Stdout when nil.
	Stdout io.Writer
	// Logger receives diagnostics; discarded when nil, because stdout is
	// the CNI protocol and runtimes treat stderr inconsistently.
	Logger *slog.Logger
	// FindPeer finds the host veth; FindVethPeer when nil. Tests replace it
	// to exercise agent handling without network namespaces.
	FindPeer func(netnsPath, ifName string) (Peer, error)
}

// Plugin implements the CNI commands.
type Plugin struct {
	stdout   io.Writer
	log      *slog.Logger
	findPeer func(netnsPath, ifName string) (Peer, error)
}

// New returns a Plugin.
func New(opts Options) *Plugin {
	p := &Plugin{stdout: opts.Stdout, log: opts.Logger, findPeer: opts.FindPeer}
	if p.stdout == nil {
		p.stdout = os.Stdout
	}
	if p.log == nil {
		p.log = slog.New(slog.DiscardHandler)
	}
	if p.findPeer == nil {
		p.findPeer = FindVethPeer
	}
	return p
}

// Funcs returns the handlers for skel.PluginMainFuncs.
func (p *Plugin) Funcs() skel.CNIFuncs {
	return skel.CNIFuncs{Add: p.Add, Del: p.Del, Check: p.Check, GC: p.GC, Status: p.Status}
}

func newClient(c *Config) *api.Client {
	return api.NewClient(api.ClientConfig{Socket: c.Socket, Timeout: requestTimeout})
}

// Add hands the endpoint to the agent and prints prevResult once the agent
// enforces policy on it. It never succeeds without enforcement.
func (p *Plugin) Add(args *skel.CmdArgs) error {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return err
	}
	prev, err := conf.requirePrevResult("ADD")
	if err != nil {
		return err
	}
	pod, err := parsePodArgs(args.Args)
	if err != nil {
		return err
	}
	if pod, err = conf.requirePod(pod, args.ContainerID); err != nil {
		return err
	}
	ips := endpointIPs(prev, args.IfName)
	if err := api.CheckPodIPs(ips); err != nil {
		return types.NewError(types.ErrInvalidNetworkConfig,
			fmt.Sprintf("bulkhead-cni: prevResult for %s: %v", args.IfName, err),
			"bulkhead-cni enforces policy by the pod's own addresses; the primary plugin must assign the interface at least one unicast host address")
	}
	peer, err := p.findPeer(args.Netns, args.IfName)
	if err != nil {
		return peerError(err)
	}
	mac, err := endpointMAC(prev, args.IfName, peer.PodMAC)
	if err != nil {
		return types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf("bulkhead-cni: %v", err), "")
	}
	req := api.EndpointAddRequest{
		EndpointKey: api.EndpointKey{ContainerID: args.ContainerID, IfName: args.IfName},
		Network:     conf.Name,
		Netns:       args.Netns,
		PodIfIndex:  peer.PodIfIndex,
		HostVeth:    peer.HostIfName,
		HostIfIndex: peer.HostIfIndex,
		IPs:         ips,
		MAC:         mac,
		Pod:         pod,
	}
	client := newClient(conf)
	defer client.Close()
	resp, err := p.addWithRetry(context.Background(), client, req, conf.AgentWait)
	if err != nil {
		return err
	}
	if !resp.Enforced {
		return types.NewError(types.ErrInternal,
			fmt.Sprintf("bulkhead-agent accepted endpoint %s/%s but reports it is not enforced", args.ContainerID, args.IfName),
			"check the bulkhead-agent log; the pod is not started without enforcement")
	}
	p.log.Debug("endpoint enforced", "container", args.ContainerID, "hostVeth", peer.HostIfName, "identity", resp.IdentityID)
	out, err := conf.PrevResult.GetAsVersion(conf.CNIVersion)
	if err != nil {
		return types.NewError(types.ErrIncompatibleCNIVersion, fmt.Sprintf("bulkhead-cni: convert prevResult to %s: %v", conf.CNIVersion, err), "")
	}
	return out.PrintTo(p.stdout)
}

// addWithRetry retries while the agent is unreachable or not ready, with
// exponential backoff, for at most wait. This closes the startup race in
// which a pod that starts before the agent would run unenforced.
func (p *Plugin) addWithRetry(ctx context.Context, c *api.Client, req api.EndpointAddRequest, wait time.Duration) (api.EndpointAddResponse, error) {
	start := time.Now()
	deadline := start.Add(wait)
	backoff := firstBackoff
	for attempt := 1; ; attempt++ {
		resp, err := c.AddEndpoint(ctx, req)
		if err == nil {
			return resp, nil
		}
		if !errors.Is(err, api.ErrUnavailable) && !errors.Is(err, api.ErrNotReady) {
			return resp, types.NewError(types.ErrInternal,
				fmt.Sprintf("bulkhead-agent refused endpoint %s/%s: %v", req.ContainerID, req.IfName, err), "")
		}
		remaining := time.Until(deadline)
		if remaining <= 0 {
			return resp, agentWaitError(c.Socket(), time.Since(start), attempt, err)
		}
		p.log.Debug("agent not ready, retrying", "attempt", attempt, "error", err)
		t := time.NewTimer(min(backoff, remaining))
		select {
		case <-ctx.Done():
			t.Stop()
			return resp, agentWaitError(c.Socket(), time.Since(start), attempt, err)
		case <-t.C:
		}
		backoff = min(2*backoff, maxBackoff)
	}
}

func agentWaitError(socket string, waited time.Duration, attempts int, last error) error {
	what := "is not reachable"
	if errors.Is(last, api.ErrNotReady) {
		what = "is running but not ready"
	}
	return types.NewError(types.ErrTryAgainLater,
		fmt.Sprintf("bulkhead-agent %s at %s after %s (%d attempts); the pod was not started because its policy could not be enforced",
			what, socket, waited.Round(time.Millisecond), attempts),
		fmt.Sprintf("start bulkhead-agent on this node (or check its log), and make sure the conflist \"socket\" matches the agent's --socket; "+
			"raise \"agentWaitSeconds\" to wait longer; last error: %v", last))
}

// Del tells the agent to forget the endpoint. It is idempotent and succeeds
// when the agent is down or does not know the endpoint: the agent removes
// endpoints whose veth is gone when it reconciles.
func (p *Plugin) Del(args *skel.CmdArgs) error {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return err
	}
	client := newClient(conf)
	defer client.Close()
	ctx, cancel := context.WithTimeout(context.Background(), delTimeout)
	defer cancel()
	_, err = client.DeleteEndpoint(ctx, api.EndpointDelRequest{
		EndpointKey: api.EndpointKey{ContainerID: args.ContainerID, IfName: args.IfName},
		Netns:       args.Netns,
	})
	switch {
	case err == nil, errors.Is(err, api.ErrEndpointNotFound):
		return nil
	case errors.Is(err, api.ErrUnavailable), errors.Is(err, api.ErrNotReady):
		p.log.Info("agent unavailable on DEL; it reconciles later", "container", args.ContainerID, "error", err)
		return nil
	default:
		return types.NewError(types.ErrInternal,
			fmt.Sprintf("bulkhead-agent failed to delete endpoint %s/%s: %v", args.ContainerID, args.IfName, err), "")
	}
}

// Check fails unless the agent knows the endpoint, has its programs on the
// veth the pod interface is paired with right now, and its identity is
// current.
func (p *Plugin) Check(args *skel.CmdArgs) error {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return err
	}
	prev, err := conf.requirePrevResult("CHECK")
	if err != nil {
		return err
	}
	peer, err := p.findPeer(args.Netns, args.IfName)
	if err != nil {
		return peerError(err)
	}
	client := newClient(conf)
	defer client.Close()
	resp, err := client.CheckEndpoint(context.Background(), api.EndpointCheckRequest{
		EndpointKey: api.EndpointKey{ContainerID: args.ContainerID, IfName: args.IfName},
		Netns:       args.Netns,
		HostVeth:    peer.HostIfName,
		HostIfIndex: peer.HostIfIndex,
		IPs:         endpointIPs(prev, args.IfName),
	})
	if err != nil {
		if errors.Is(err, api.ErrUnavailable) || errors.Is(err, api.ErrNotReady) {
			return types.NewError(types.ErrTryAgainLater,
				fmt.Sprintf("bulkhead-agent at %s cannot confirm enforcement of %s/%s: %v", conf.Socket, args.ContainerID, args.IfName, err), "")
		}
		if errors.Is(err, api.ErrEndpointNotFound) {
			return types.NewError(types.ErrUnknownContainer,
				fmt.Sprintf("bulkhead-agent does not know endpoint %s/%s", args.ContainerID, args.IfName), "")
		}
		return types.NewError(types.ErrInternal, fmt.Sprintf("bulkhead-agent check of %s/%s: %v", args.ContainerID, args.IfName, err), "")
	}
	if resp.Healthy() {
		return nil
	}
	var problems []string
	if !resp.Known {
		problems = append(problems, "endpoint unknown to the agent")
	}
	if resp.Known && !resp.Attached {
		problems = append(problems, fmt.Sprintf("programs not attached to host veth %s (index %d)", peer.HostIfName, peer.HostIfIndex))
	}
	if resp.Known && !resp.IdentityCurrent {
		problems = append(problems, "identity is stale")
	}
	problems = append(problems, resp.Problems...)
	code := uint(types.ErrInternal)
	if !resp.Known {
		code = types.ErrUnknownContainer
	}
	return types.NewError(code,
		fmt.Sprintf("bulkhead-cni CHECK failed for %s/%s: %s", args.ContainerID, args.IfName, strings.Join(problems, "; ")), "")
}

// Status fails while the agent is unreachable or not ready, so the runtime
// does not schedule pods that ADD would reject.
func (p *Plugin) Status(args *skel.CmdArgs) error {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return err
	}
	client := newClient(conf)
	defer client.Close()
	st, err := client.Status(context.Background())
	if err != nil {
		return types.NewError(types.ErrPluginNotAvailable,
			fmt.Sprintf("bulkhead-agent is not reachable at %s: %v", conf.Socket, err),
			"start bulkhead-agent on this node, and make sure the conflist \"socket\" matches its --socket")
	}
	if !st.Ready {
		return types.NewError(types.ErrPluginNotAvailable, fmt.Sprintf("bulkhead-agent at %s is not ready: %s", conf.Socket, st.Reason), "")
	}
	return nil
}

// GC asks the agent to remove endpoints of this network that the runtime
// no longer lists in cni.dev/valid-attachments. Without a list it removes
// nothing: a missing list must not read as "nothing is valid".
func (p *Plugin) GC(args *skel.CmdArgs) error {
	conf, err := ParseConfig(args.StdinData)
	if err != nil {
		return err
	}
	if conf.ValidAttachments == nil {
		p.log.Info("GC without cni.dev/valid-attachments; nothing removed")
		return nil
	}
	req := api.GCRequest{Network: conf.Name, ValidAttachments: make([]api.EndpointKey, 0, len(conf.ValidAttachments))}
	for _, a := range conf.ValidAttachments {
		req.ValidAttachments = append(req.ValidAttachments, api.EndpointKey{ContainerID: a.ContainerID, IfName: a.IfName})
	}
	client := newClient(conf)
	defer client.Close()
	if _, err := client.GCEndpoints(context.Background(), req); err != nil {
		code := uint(types.ErrInternal)
		if errors.Is(err, api.ErrUnavailable) || errors.Is(err, api.ErrNotReady) {
			code = types.ErrTryAgainLater
		}
		return types.NewError(code, fmt.Sprintf("bulkhead-agent GC at %s: %v", conf.Socket, err), "")
	}
	return nil
}

// peerError maps veth discovery failures to CNI errors.
func peerError(err error) error {
	switch {
	case errors.Is(err, ErrNetnsGone):
		return types.NewError(types.ErrInvalidNetNS, fmt.Sprintf("bulkhead-cni: %v", err), "")
	case errors.Is(err, ErrNotVeth):
		return types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf("bulkhead-cni: %v", err),
			"bulkhead-cni needs a veth-based primary plugin (ptp, bridge, ...)")
	default:
		return types.NewError(types.ErrInternal, fmt.Sprintf("bulkhead-cni: find host veth: %v", err), "")
	}
}

// endpointMAC is the MAC the pod sends from: the one prevResult gives
// ifName inside the sandbox, else the one the interface has (link, read in
// the pod's netns; some primaries report no MAC). The agent drops every
// frame from the pod with another source MAC, so when both are known and
// differ (a plugin changed the MAC without saying so) the ADD fails rather
// than start a pod that cannot send.
func endpointMAC(res *current.Result, ifName string, link net.HardwareAddr) (string, error) {
	var fromResult net.HardwareAddr
	for _, iface := range res.Interfaces {
		if iface.Name != ifName || iface.Sandbox == "" || iface.Mac == "" {
			continue
		}
		mac, err := net.ParseMAC(iface.Mac)
		if err != nil || len(mac) != 6 {
			return "", fmt.Errorf("prevResult interface %s: invalid MAC %q", ifName, iface.Mac)
		}
		fromResult = mac
	}
	switch {
	case fromResult != nil && link != nil && !bytes.Equal(fromResult, link):
		return "", fmt.Errorf("prevResult gives %s MAC %s, but the interface has %s", ifName, fromResult, link)
	case fromResult != nil:
		return fromResult.String(), nil
	case len(link) == 6:
		return link.String(), nil
	}
	return "", fmt.Errorf("no MAC for %s in prevResult or on the interface", ifName)
}

// endpointIPs returns the addresses prevResult assigned to ifName inside the
// sandbox. When none is attributed to it, the IPs that the result attributes
// to no interface are taken; never those it gives to another interface (a
// host-side veth, a bridge): the pod would be allowed to send from them and
// the ipcache would name it as their owner.
func endpointIPs(res *current.Result, ifName string) []netip.Prefix {
	var own, unattributed []netip.Prefix
	for _, ipc := range res.IPs {
		addr, ok := netip.AddrFromSlice(ipc.Address.IP)
		if !ok {
			continue
		}
		ones, bits := ipc.Address.Mask.Size()
		if addr.Is4In6() && bits == 128 {
			ones -= 96
		}
		pfx := netip.PrefixFrom(addr.Unmap(), ones)
		if !pfx.IsValid() {
			continue
		}
		if ipc.Interface == nil || *ipc.Interface < 0 || *ipc.Interface >= len(res.Interfaces) {
			unattributed = append(unattributed, pfx)
			continue
		}
		if iface := res.Interfaces[*ipc.Interface]; iface.Name == ifName && iface.Sandbox != "" {
			own = append(own, pfx)
		}
	}
	if len(own) > 0 {
		return own
	}
	return unattributed
}
