package identity

import (
	"errors"
	"fmt"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// DefaultTrustDomain is the trust domain when none is configured.
const DefaultTrustDomain = "cluster.local"

// SPIFFEID returns the workload's SPIFFE ID: the issued one when an SVID
// source issued one, else spiffe://<td>/ns/<namespace>/sa/<serviceAccount>,
// with the "default" service account when none is set.
func (l Labels) SPIFFEID(trustDomain string) (spiffeid.ID, error) {
	if l.Issued != "" {
		id, err := spiffeid.FromString(l.Issued)
		if err != nil {
			return spiffeid.ID{}, fmt.Errorf("issued spiffe id %q: %w", l.Issued, err)
		}
		return id, nil
	}
	return l.Derived(trustDomain)
}

// Derived returns spiffe://<td>/ns/<namespace>/sa/<serviceAccount>, the ID
// Bulkhead derives for a workload that no SVID source named otherwise.
func (l Labels) Derived(trustDomain string) (spiffeid.ID, error) {
	td, err := spiffeid.TrustDomainFromString(trustDomain)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("trust domain %q: %w", trustDomain, err)
	}
	id, err := spiffeid.FromSegments(td, "ns", l.Namespace, "sa", l.SA())
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("spiffe id of %s/%s: %w", l.Namespace, l.SA(), err)
	}
	return id, nil
}

// SPIFFEPattern is an exact SPIFFE ID, or a glob in which a path segment that
// is exactly "*" matches any one segment (spiffe://cluster.local/ns/shop/sa/*).
// Globs stop at segment boundaries, so "ns/sh*" is not a glob and is invalid.
type SPIFFEPattern struct {
	trustDomain string // "*" matches any trust domain
	segments    []string
}

// ParseSPIFFEPattern validates a pattern with go-spiffe's rules, after
// substituting the wildcard segments.
func ParseSPIFFEPattern(s string) (SPIFFEPattern, error) {
	const scheme = "spiffe://"
	if !strings.HasPrefix(s, scheme) {
		return SPIFFEPattern{}, fmt.Errorf("spiffe pattern %q: scheme must be spiffe://", s)
	}
	rest := strings.TrimPrefix(s, scheme)
	td, path, _ := strings.Cut(rest, "/")
	var segs []string
	if path != "" {
		segs = strings.Split(path, "/")
	}
	// Validate by building the ID with every "*" replaced by a legal segment.
	probeTD := td
	if td == "*" {
		probeTD = "wildcard"
	}
	probe := make([]string, len(segs))
	for i, seg := range segs {
		if seg == "*" {
			probe[i] = "wildcard"
			continue
		}
		if strings.Contains(seg, "*") {
			return SPIFFEPattern{}, fmt.Errorf("spiffe pattern %q: a glob must be a whole path segment", s)
		}
		probe[i] = seg
	}
	t, err := spiffeid.TrustDomainFromString(probeTD)
	if err != nil {
		return SPIFFEPattern{}, fmt.Errorf("spiffe pattern %q: %w", s, err)
	}
	if len(segs) == 0 {
		return SPIFFEPattern{}, fmt.Errorf("spiffe pattern %q: %w", s, errors.New("a workload pattern needs a path"))
	}
	if _, err := spiffeid.FromSegments(t, probe...); err != nil {
		return SPIFFEPattern{}, fmt.Errorf("spiffe pattern %q: %w", s, err)
	}
	return SPIFFEPattern{trustDomain: td, segments: segs}, nil
}

// Match reports whether id matches the pattern.
func (p SPIFFEPattern) Match(id spiffeid.ID) bool {
	if p.trustDomain != "*" && p.trustDomain != id.TrustDomain().Name() {
		return false
	}
	segs := strings.Split(strings.TrimPrefix(id.Path(), "/"), "/")
	if len(segs) != len(p.segments) {
		return false
	}
	for i, s := range p.segments {
		if s != "*" && s != segs[i] {
			return false
		}
	}
	return true
}

// IsExact reports whether the pattern has no wildcard.
func (p SPIFFEPattern) IsExact() bool {
	if p.trustDomain == "*" {
		return false
	}
	for _, s := range p.segments {
		if s == "*" {
			return false
		}
	}
	return true
}

// Namespace returns the namespace a pattern of the form
// spiffe://td/ns/<namespace>/... names exactly, if it does.
func (p SPIFFEPattern) Namespace() (string, bool) {
	if len(p.segments) >= 2 && p.segments[0] == "ns" && p.segments[1] != "*" {
		return p.segments[1], true
	}
	return "", false
}
