package spire

import (
	"errors"
	"strings"

	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"

	"github.com/bulkhead-io/bulkhead/identity"
)

// The selectors SPIRE's k8s workload attestor produces for a pod, so that
// the entries an operator writes for SPIRE's own Kubernetes attestation
// match the pods this agent asks about.
const (
	selectorType    = "k8s"
	selNamespace    = "ns"
	selSA           = "sa"
	selPodUID       = "pod-uid"
	selPodName      = "pod-name"
	defaultSAName   = "default"
	selectorSepChar = ":"
)

// ErrNoNamespace is returned by Selectors for a workload without namespace:
// every pod has one, and asking SPIRE without it could match entries meant
// for other namespaces.
var ErrNoNamespace = errors.New("workload has no namespace")

// Selectors are the k8s selectors for w: k8s:ns, k8s:sa (default
// "default"), k8s:pod-uid when the UID is known and k8s:pod-name when the
// name is. SPIRE matches an entry when the entry's selectors are a subset of
// these. Values may contain ':' (SPIRE splits a selector at the first one).
func Selectors(w identity.Workload) ([]*types.Selector, error) {
	if w.Namespace == "" {
		return nil, ErrNoNamespace
	}
	sa := w.ServiceAccount
	if sa == "" {
		sa = defaultSAName
	}
	sels := []*types.Selector{
		{Type: selectorType, Value: selNamespace + selectorSepChar + w.Namespace},
		{Type: selectorType, Value: selSA + selectorSepChar + sa},
	}
	if w.UID != "" {
		sels = append(sels, &types.Selector{Type: selectorType, Value: selPodUID + selectorSepChar + w.UID})
	}
	if w.Name != "" {
		sels = append(sels, &types.Selector{Type: selectorType, Value: selPodName + selectorSepChar + w.Name})
	}
	return sels, nil
}

// selectorString is the "type:value" form SPIRE's CLI and logs use.
func selectorString(s *types.Selector) string { return s.GetType() + selectorSepChar + s.GetValue() }

func selectorsString(sels []*types.Selector) string {
	parts := make([]string, len(sels))
	for i, s := range sels {
		parts[i] = selectorString(s)
	}
	return strings.Join(parts, ", ")
}
