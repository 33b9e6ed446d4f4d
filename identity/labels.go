package identity

import (
	"maps"
	"slices"
	"strconv"
	"strings"
)

// LabelMTLS enrolls a workload in the mTLS tunnel when it is set to
// MTLSEnabled on the pod or on its namespace.
const LabelMTLS = "bulkhead.io/mtls"

// MTLSEnabled is the value of LabelMTLS that enrolls.
const MTLSEnabled = "enabled"

// DefaultServiceAccount is the service account of a pod that names none, as
// Kubernetes assigns it.
const DefaultServiceAccount = "default"

// Labels is the security-relevant label set of a workload: everything a
// policy can select a pod by. Two pods with equal Labels are
// indistinguishable to policy and so share one numeric identity.
type Labels struct {
	Namespace       string
	NamespaceLabels map[string]string
	PodLabels       map[string]string
	// ServiceAccount is empty for "default"; use SA to read it.
	ServiceAccount string
	// Issued is the SPIFFE ID an SVID source issued to the workload
	// (SPIRE's is authoritative), empty when none did: the workload's ID is
	// then the derived spiffe://<td>/ns/<ns>/sa/<sa>. Policies select by
	// SPIFFE ID, so it is part of the label set.
	Issued string
}

// SA returns the service account, defaulted the way Kubernetes defaults it.
func (l Labels) SA() string {
	if l.ServiceAccount == "" {
		return DefaultServiceAccount
	}
	return l.ServiceAccount
}

// Enrolled reports whether the workload is enrolled in the mTLS tunnel: the
// pod or its namespace carries LabelMTLS=MTLSEnabled. Both label sets are
// part of Key, so enrollment never differs between workloads that share a
// numeric identity, and a change of it moves the workload to another one.
func (l Labels) Enrolled() bool {
	return l.PodLabels[LabelMTLS] == MTLSEnabled || l.NamespaceLabels[LabelMTLS] == MTLSEnabled
}

// Key is a canonical encoding of the label set: equal sets give equal keys,
// different sets give different keys (every string is length-prefixed, so no
// separator can be forged by a label value).
func (l Labels) Key() string {
	var b strings.Builder
	writeLP(&b, l.Namespace)
	writeLP(&b, l.SA())
	writeMap(&b, l.NamespaceLabels)
	writeMap(&b, l.PodLabels)
	if l.Issued != "" {
		// Only when set, so that the keys of workloads without one stay
		// what persisted identity numberings hold.
		b.WriteString("issued=")
		writeLP(&b, l.Issued)
	}
	return b.String()
}

func writeMap(b *strings.Builder, m map[string]string) {
	b.WriteString(strconv.Itoa(len(m)))
	b.WriteByte('{')
	for _, k := range slices.Sorted(maps.Keys(m)) {
		writeLP(b, k)
		writeLP(b, m[k])
	}
	b.WriteByte('}')
}

func writeLP(b *strings.Builder, s string) {
	b.WriteString(strconv.Itoa(len(s)))
	b.WriteByte(':')
	b.WriteString(s)
}
