package cni

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/bulkhead-io/bulkhead/agent/api"
)

// prevResultFor is what ptp returns, in the shape of each spec version:
// 0.3.x/0.4.0 results carry "version" on each IP, 1.x results do not.
func prevResultFor(ver string) string {
	ipVersion := ""
	if ver == "0.3.1" || ver == "0.4.0" {
		ipVersion = `"version": "4",`
	}
	return fmt.Sprintf(`{
		"cniVersion": %q,
		"interfaces": [
			{"name": "veth1234", "mac": "aa:bb:cc:dd:ee:01"},
			{"name": "eth0", "mac": "aa:bb:cc:dd:ee:02", "sandbox": "/var/run/netns/pod"}
		],
		"ips": [{%s "address": "10.213.7.5/24", "gateway": "10.213.7.1", "interface": 1}],
		"routes": [{"dst": "0.0.0.0/0"}],
		"dns": {}
	}`, ver, ipVersion)
}

func confFor(ver string, extra string) []byte {
	return []byte(fmt.Sprintf(`{"cniVersion": %q, "name": "pods", "type": "bulkhead-cni"%s, "prevResult": %s}`, ver, extra, prevResultFor(ver)))
}

func TestParseConfigSpecVersions(t *testing.T) {
	for _, ver := range SupportedVersions() {
		t.Run(ver, func(t *testing.T) {
			c, err := ParseConfig(confFor(ver, ""))
			if err != nil {
				t.Fatalf("ParseConfig: %v", err)
			}
			if c.CNIVersion != ver || c.Name != "pods" {
				t.Errorf("version/name = %q/%q", c.CNIVersion, c.Name)
			}
			if c.Socket != api.DefaultSocket || c.AgentWait != DefaultAgentWait {
				t.Errorf("defaults: socket %q wait %v", c.Socket, c.AgentWait)
			}
			if c.PrevResult == nil || c.PrevResult.Version() != ver {
				t.Fatalf("prevResult = %v, want version %s", c.PrevResult, ver)
			}
			res, err := c.requirePrevResult("ADD")
			if err != nil {
				t.Fatalf("requirePrevResult: %v", err)
			}
			ips := endpointIPs(res, "eth0")
			if len(ips) != 1 || ips[0] != netip.MustParsePrefix("10.213.7.5/24") {
				t.Errorf("endpoint IPs = %v", ips)
			}
			// ADD prints prevResult in the config's version, unchanged.
			out, err := c.PrevResult.GetAsVersion(ver)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := json.Marshal(out)
			var roundTrip map[string]any
			if err := json.Unmarshal(b, &roundTrip); err != nil || roundTrip["cniVersion"] != ver {
				t.Errorf("printed result %s", b)
			}
		})
	}
}

func TestParseConfigFields(t *testing.T) {
	c, err := ParseConfig(confFor("1.0.0", `, "socket": "/run/x/../y/agent.sock", "agentWaitSeconds": 1.5`))
	if err != nil {
		t.Fatal(err)
	}
	if c.Socket != "/run/y/agent.sock" || c.AgentWait != 1500*time.Millisecond {
		t.Errorf("socket %q wait %v", c.Socket, c.AgentWait)
	}
	c, err = ParseConfig(confFor("1.0.0", `, "agentWaitSeconds": 0`))
	if err != nil || c.AgentWait != 0 {
		t.Errorf("agentWaitSeconds 0: %v, %v", c, err)
	}
}

func TestParseConfigErrors(t *testing.T) {
	tests := []struct {
		name  string
		stdin string
		code  uint
		msg   string
	}{
		{"empty", ``, types.ErrDecodingFailure, "not valid JSON"},
		{"bad json", `{"cniVersion": "1.0.0",`, types.ErrDecodingFailure, "not valid JSON"},
		{"not an object", `[1,2]`, types.ErrDecodingFailure, "wrong type"},
		{"socket wrong type", `{"cniVersion":"1.0.0","name":"n","socket":5}`, types.ErrDecodingFailure, `"socket"`},
		{"wait wrong type", `{"cniVersion":"1.0.0","name":"n","agentWaitSeconds":"30"}`, types.ErrDecodingFailure, `"agentWaitSeconds"`},
		{"name wrong type", `{"cniVersion":"1.0.0","name":7}`, types.ErrDecodingFailure, `"name"`},
		{"prevResult wrong type", `{"cniVersion":"1.0.0","name":"n","prevResult":"x"}`, types.ErrDecodingFailure, "prevResult"},
		{"attachments wrong type", `{"cniVersion":"1.1.0","name":"n","cni.dev/valid-attachments":{}}`, types.ErrDecodingFailure, "valid-attachments"},
		{"missing version", `{"name":"n"}`, types.ErrInvalidNetworkConfig, "cniVersion is required"},
		{"old version", `{"cniVersion":"0.2.0","name":"n"}`, types.ErrIncompatibleCNIVersion, "0.2.0"},
		{"future version", `{"cniVersion":"9.9.9","name":"n"}`, types.ErrIncompatibleCNIVersion, "9.9.9"},
		{"missing name", `{"cniVersion":"1.0.0"}`, types.ErrInvalidNetworkConfig, "name is required"},
		{"relative socket", `{"cniVersion":"1.0.0","name":"n","socket":"agent.sock"}`, types.ErrInvalidNetworkConfig, "absolute"},
		{"negative wait", `{"cniVersion":"1.0.0","name":"n","agentWaitSeconds":-1}`, types.ErrInvalidNetworkConfig, "agentWaitSeconds"},
		{"huge wait", `{"cniVersion":"1.0.0","name":"n","agentWaitSeconds":1e9}`, types.ErrInvalidNetworkConfig, "agentWaitSeconds"},
		{"bad prevResult ip", `{"cniVersion":"1.0.0","name":"n","prevResult":{"cniVersion":"1.0.0","ips":[{"address":"nonsense"}]}}`, types.ErrDecodingFailure, "prevResult"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := ParseConfig([]byte(tt.stdin))
			if err == nil {
				t.Fatalf("ParseConfig(%s) = %+v, want error", tt.stdin, c)
			}
			var ce *types.Error
			if !errors.As(err, &ce) {
				t.Fatalf("error %v is %T, want *types.Error", err, err)
			}
			if ce.Code != tt.code {
				t.Errorf("code = %d, want %d (%v)", ce.Code, tt.code, err)
			}
			if !strings.Contains(err.Error(), tt.msg) {
				t.Errorf("error %q does not mention %q", err, tt.msg)
			}
		})
	}
}

func TestRequirePrevResult(t *testing.T) {
	c, err := ParseConfig([]byte(`{"cniVersion":"1.0.0","name":"n"}`))
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.requirePrevResult("ADD")
	var ce *types.Error
	if !errors.As(err, &ce) || ce.Code != types.ErrInvalidNetworkConfig || !strings.Contains(ce.Msg, "prevResult") {
		t.Errorf("missing prevResult: %v", err)
	}
}

func TestParseConfigValidAttachments(t *testing.T) {
	c, err := ParseConfig([]byte(`{"cniVersion":"1.1.0","name":"n"}`))
	if err != nil || c.ValidAttachments != nil {
		t.Errorf("absent list: %v, %v; want nil", c.ValidAttachments, err)
	}
	c, err = ParseConfig([]byte(`{"cniVersion":"1.1.0","name":"n","cni.dev/valid-attachments":[]}`))
	if err != nil || c.ValidAttachments == nil || len(c.ValidAttachments) != 0 {
		t.Errorf("empty list: %#v, %v; want empty non-nil", c.ValidAttachments, err)
	}
	c, err = ParseConfig([]byte(`{"cniVersion":"1.1.0","name":"n","cni.dev/attachments":[{"containerID":"a","ifname":"eth0"}]}`))
	if err != nil || len(c.ValidAttachments) != 1 || c.ValidAttachments[0].ContainerID != "a" {
		t.Errorf("legacy key: %v, %v", c.ValidAttachments, err)
	}
}

func TestParsePodArgs(t *testing.T) {
	pod, err := parsePodArgs("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-0;K8S_POD_INFRA_CONTAINER_ID=abc;K8S_POD_UID=1234-5678")
	if err != nil {
		t.Fatal(err)
	}
	if pod != (api.PodRef{Namespace: "shop", Name: "cart-0", UID: "1234-5678"}) {
		t.Errorf("pod = %+v", pod)
	}
	// Unknown keys are ignored even without IgnoreUnknown.
	if pod, err := parsePodArgs("FOO=bar;K8S_POD_NAME=x"); err != nil || pod.Name != "x" {
		t.Errorf("unknown key: %+v, %v", pod, err)
	}
	if pod, err := parsePodArgs(""); err != nil || pod != (api.PodRef{}) {
		t.Errorf("empty: %+v, %v", pod, err)
	}
	var ce *types.Error
	if _, err := parsePodArgs("K8S_POD_NAME"); !errors.As(err, &ce) || ce.Code != types.ErrInvalidEnvironmentVariables {
		t.Errorf("malformed: %v", err)
	}
}

func TestEndpointIPs(t *testing.T) {
	res, err := current.NewResult([]byte(`{"cniVersion":"1.0.0",
		"interfaces":[{"name":"eth0","sandbox":"/x"},{"name":"net1","sandbox":"/x"}],
		"ips":[{"address":"10.213.1.2/24","interface":0},{"address":"fd00:213::2/64","interface":0},{"address":"10.213.9.9/24","interface":1}]}`))
	if err != nil {
		t.Fatal(err)
	}
	r := res.(*current.Result)
	got := endpointIPs(r, "eth0")
	want := []netip.Prefix{netip.MustParsePrefix("10.213.1.2/24"), netip.MustParsePrefix("fd00:213::2/64")}
	if !slices.Equal(got, want) {
		t.Errorf("eth0 IPs = %v, want %v", got, want)
	}
	// An IP the result gives to another interface (here a host-side one)
	// never becomes the pod's, even when none is given to eth0.
	hostSide, err := current.NewResult([]byte(`{"cniVersion":"1.0.0",
		"interfaces":[{"name":"veth1"},{"name":"eth1","sandbox":"/x"}],
		"ips":[{"address":"10.213.1.1/24","interface":0},{"address":"10.213.1.2/24"}]}`))
	if err != nil {
		t.Fatal(err)
	}
	if got := endpointIPs(hostSide.(*current.Result), "eth0"); !slices.Equal(got, []netip.Prefix{netip.MustParsePrefix("10.213.1.2/24")}) {
		t.Errorf("IPs with one on a host-side interface = %v, want only the unattributed 10.213.1.2/24", got)
	}
	// Without interface references, every IP belongs to the endpoint.
	for _, ip := range r.IPs {
		ip.Interface = nil
	}
	if got := endpointIPs(r, "eth0"); len(got) != 3 {
		t.Errorf("unreferenced IPs = %v, want all 3", got)
	}
}

// FuzzParseConfig checks that no stdin makes the parser panic, that every
// rejection is a coded CNI error, and that every accepted config is valid.
func FuzzParseConfig(f *testing.F) {
	for _, v := range SupportedVersions() {
		f.Add(confFor(v, ""))
		f.Add(confFor(v, `, "socket": "/run/a.sock", "agentWaitSeconds": 3`))
	}
	f.Add([]byte(`{"cniVersion":"1.1.0","name":"n","cni.dev/valid-attachments":[{"containerID":"a","ifname":"eth0"}]}`))
	f.Add([]byte(`{"cniVersion":"1.0.0","name":"n","prevResult":{"ips":[{"address":"10.0.0.1/8","interface":-4}]}}`))
	f.Add([]byte(`{"cniVersion":"1.0.0","name":"n","agentWaitSeconds":1e308}`))
	f.Add([]byte(`null`))
	f.Fuzz(func(t *testing.T, stdin []byte) {
		c, err := ParseConfig(stdin)
		if err != nil {
			var ce *types.Error
			if !errors.As(err, &ce) || ce.Code == 0 || ce.Msg == "" {
				t.Fatalf("error %v (%T) is not a coded CNI error", err, err)
			}
			return
		}
		if !slices.Contains(SupportedVersions(), c.CNIVersion) || c.Name == "" {
			t.Fatalf("accepted config with version %q name %q", c.CNIVersion, c.Name)
		}
		if c.AgentWait < 0 || c.AgentWait > maxAgentWait || !strings.HasPrefix(c.Socket, "/") {
			t.Fatalf("accepted wait %v socket %q", c.AgentWait, c.Socket)
		}
		if c.PrevResult != nil {
			res, err := c.requirePrevResult("ADD")
			if err != nil {
				return
			}
			for _, p := range endpointIPs(res, "eth0") {
				if !p.IsValid() {
					t.Fatalf("invalid endpoint prefix %v", p)
				}
			}
			if _, err := c.PrevResult.GetAsVersion(c.CNIVersion); err != nil {
				t.Fatalf("accepted prevResult cannot be printed as %s: %v", c.CNIVersion, err)
			}
		}
	})
}

// FuzzParsePodArgs checks CNI_ARGS parsing: no panic, coded errors only,
// and accepted pod references come from the K8S_POD_* keys.
func FuzzParsePodArgs(f *testing.F) {
	f.Add("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=cart-0;K8S_POD_UID=u")
	f.Add("K8S_POD_NAME")
	f.Add("CommonArgs=1;IgnoreUnknown=maybe")
	f.Add(";;=")
	f.Fuzz(func(t *testing.T, args string) {
		pod, err := parsePodArgs(args)
		if err != nil {
			var ce *types.Error
			if !errors.As(err, &ce) || ce.Code != types.ErrInvalidEnvironmentVariables {
				t.Fatalf("error %v is not a CNI_ARGS error", err)
			}
			return
		}
		for _, v := range []string{pod.Namespace, pod.Name, pod.UID} {
			if v != "" && !strings.Contains(args, v) {
				t.Fatalf("pod field %q not in CNI_ARGS %q", v, args)
			}
		}
	})
}
