package cni

import (
	"encoding/json"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/bulkhead-io/bulkhead/agent/api"
)

// DefaultAgentWait is how long ADD waits for an agent that is not up yet.
// Nodes start the agent DaemonSet and pods concurrently; 30 s covers an
// agent restart without holding kubelet's ADD (4 min timeout) for long.
const DefaultAgentWait = 30 * time.Second

// maxAgentWait keeps a typo such as 3000 from hanging pod creation.
const maxAgentWait = 10 * time.Minute

// SupportedVersions are the CNI spec versions bulkhead-cni speaks
// (DESIGN.md §5).
func SupportedVersions() []string { return []string{"0.3.1", "0.4.0", "1.0.0", "1.1.0"} }

// PluginInfo is what VERSION reports.
func PluginInfo() version.PluginInfo { return version.PluginSupports(SupportedVersions()...) }

// About is printed when the binary runs without CNI_COMMAND.
const About = "bulkhead-cni: chained CNI plugin that hands pods to bulkhead-agent for policy enforcement"

// rawConfig is the plugin's entry in the conflist, as the runtime sends it.
type rawConfig struct {
	types.PluginConf
	Socket           string   `json:"socket,omitempty"`
	AgentWaitSeconds *float64 `json:"agentWaitSeconds,omitempty"`
	// AllowMissingPodArgs names a pod without K8S_POD_* arguments after
	// its container (see Config.AllowMissingPodArgs).
	AllowMissingPodArgs bool `json:"allowMissingPodArgs,omitempty"`
	// ValidAttachments shadows the embedded field to tell "absent" from
	// "empty": an absent list must never make GC remove every endpoint.
	ValidAttachments *[]types.GCAttachment `json:"cni.dev/valid-attachments,omitempty"`
	// LegacyAttachments is the key libcni also sends, after a spec typo
	// (containernetworking/cni#1101).
	LegacyAttachments *[]types.GCAttachment `json:"cni.dev/attachments,omitempty"`
}

// Config is the validated plugin configuration.
type Config struct {
	CNIVersion string
	Name       string
	// Socket is the agent's unix socket.
	Socket string
	// AgentWait bounds how long ADD retries while the agent is unreachable
	// or not ready.
	AgentWait time.Duration
	// PrevResult is the previous plugin's result in CNIVersion, nil when
	// the runtime sent none. ADD outputs it unchanged.
	PrevResult types.Result
	// ValidAttachments is nil when the runtime sent no list (GC only).
	ValidAttachments []types.GCAttachment
	// AllowMissingPodArgs lets an ADD without K8S_POD_NAMESPACE and
	// K8S_POD_NAME through as pod "container-<first 12 of the ID>" in
	// namespace "default" (runtimes outside Kubernetes). Off by default:
	// a pod that loses its name would otherwise be judged by the policy of
	// a made-up one.
	AllowMissingPodArgs bool
}

// ParseConfig parses and validates the plugin's stdin. Every error is a
// *types.Error with a code from the CNI spec and says which field is wrong.
func ParseConfig(stdin []byte) (*Config, error) {
	var raw rawConfig
	if err := json.Unmarshal(stdin, &raw); err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) {
			return nil, types.NewError(types.ErrDecodingFailure,
				fmt.Sprintf("bulkhead-cni config: field %q has the wrong type: got JSON %s, want %s", strings.TrimPrefix(te.Field, "PluginConf."), te.Value, te.Type), "")
		}
		return nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("bulkhead-cni config is not valid JSON: %v", err), "")
	}
	if raw.CNIVersion == "" {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "bulkhead-cni config: cniVersion is required", "")
	}
	if !slices.Contains(SupportedVersions(), raw.CNIVersion) {
		return nil, types.NewError(types.ErrIncompatibleCNIVersion,
			fmt.Sprintf("bulkhead-cni config: cniVersion %q is not supported", raw.CNIVersion),
			fmt.Sprintf("supported versions: %v", SupportedVersions()))
	}
	if raw.Name == "" {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, "bulkhead-cni config: name is required", "")
	}
	c := &Config{CNIVersion: raw.CNIVersion, Name: raw.Name, Socket: api.DefaultSocket, AgentWait: DefaultAgentWait,
		AllowMissingPodArgs: raw.AllowMissingPodArgs}
	if raw.Socket != "" {
		if !filepath.IsAbs(raw.Socket) {
			return nil, types.NewError(types.ErrInvalidNetworkConfig,
				fmt.Sprintf("bulkhead-cni config: socket %q must be an absolute path", raw.Socket), "")
		}
		c.Socket = filepath.Clean(raw.Socket)
	}
	if w := raw.AgentWaitSeconds; w != nil {
		if *w < 0 || *w > maxAgentWait.Seconds() {
			return nil, types.NewError(types.ErrInvalidNetworkConfig,
				fmt.Sprintf("bulkhead-cni config: agentWaitSeconds %v must be between 0 and %v", *w, maxAgentWait.Seconds()), "")
		}
		c.AgentWait = time.Duration(*w * float64(time.Second))
	}
	switch {
	case raw.ValidAttachments != nil:
		c.ValidAttachments = *raw.ValidAttachments
	case raw.LegacyAttachments != nil:
		c.ValidAttachments = *raw.LegacyAttachments
	}
	if raw.RawPrevResult != nil {
		if err := version.ParsePrevResult(&raw.PluginConf); err != nil {
			return nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("bulkhead-cni config: prevResult: %v", err), "")
		}
		c.PrevResult = raw.PrevResult
	}
	return c, nil
}

// requirePrevResult returns the previous plugin's result in the current
// format. A chained plugin has nothing to enforce without it.
func (c *Config) requirePrevResult(cmd string) (*current.Result, error) {
	if c.PrevResult == nil {
		return nil, types.NewError(types.ErrInvalidNetworkConfig,
			fmt.Sprintf("bulkhead-cni %s needs a prevResult: list it after the primary plugin (for example ptp or bridge) in the conflist", cmd), "")
	}
	res, err := current.NewResultFromResult(c.PrevResult)
	if err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("bulkhead-cni config: convert prevResult: %v", err), "")
	}
	return res, nil
}

// podArgs are the CNI_ARGS keys that containerd and CRI-O pass. The field
// names are the wire keys, because types.LoadArgs matches on them.
type podArgs struct {
	types.CommonArgs
	K8S_POD_NAMESPACE types.UnmarshallableString
	K8S_POD_NAME      types.UnmarshallableString
	K8S_POD_UID       types.UnmarshallableString
}

// parsePodArgs reads the pod reference from CNI_ARGS. Unknown keys are
// ignored: runtimes pass their own, and other plugins in the chain read them.
func parsePodArgs(cniArgs string) (api.PodRef, error) {
	a := podArgs{CommonArgs: types.CommonArgs{IgnoreUnknown: true}}
	if err := types.LoadArgs(cniArgs, &a); err != nil {
		return api.PodRef{}, types.NewError(types.ErrInvalidEnvironmentVariables, fmt.Sprintf("bulkhead-cni: parse CNI_ARGS: %v", err), "")
	}
	return api.PodRef{
		Namespace: string(a.K8S_POD_NAMESPACE),
		Name:      string(a.K8S_POD_NAME),
		UID:       string(a.K8S_POD_UID),
	}, nil
}

// requirePod returns the pod reference of an ADD: the K8S_POD_* arguments,
// or with allowMissingPodArgs the documented default for a runtime that
// passes none. Half a reference is never completed.
func (c *Config) requirePod(pod api.PodRef, containerID string) (api.PodRef, error) {
	switch {
	case pod.Namespace != "" && pod.Name != "":
		return pod, nil
	case pod.Namespace == "" && pod.Name == "" && c.AllowMissingPodArgs:
		id := containerID
		if len(id) > 12 {
			id = id[:12]
		}
		return api.PodRef{Namespace: "default", Name: "container-" + id, UID: pod.UID}, nil
	}
	return api.PodRef{}, types.NewError(types.ErrInvalidEnvironmentVariables,
		fmt.Sprintf("bulkhead-cni: CNI_ARGS lack K8S_POD_NAMESPACE and K8S_POD_NAME (got namespace %q, name %q): policy cannot be chosen without the pod", pod.Namespace, pod.Name),
		`runtimes outside Kubernetes can set "allowMissingPodArgs": true in the conflist to name the pod "container-<id>" in namespace "default"`)
}
