package spire

import (
	"crypto/x509"
	"errors"
	"fmt"
	"slices"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	delegatedidentityv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/delegatedidentity/v1"

	"github.com/bulkhead-io/bulkhead/identity"
)

// ErrMalformed marks a response of the SPIRE agent that does not hold valid
// SVIDs or bundles. It is reported (wrapped with
// identity.ErrSourceUnavailable) and the previous state stays.
var ErrMalformed = fmt.Errorf("%w from the SPIRE agent", identity.ErrMalformedUpdate)

// parseSVIDs turns the SVIDs of one response into go-spiffe SVIDs, in
// SPIRE's order. Every SVID is validated (SPIFFE ID in the leaf, leaf not a
// CA, key usage, private key matching the leaf), and the ID SPIRE names must
// be the leaf's. Errors never contain key material.
func parseSVIDs(resp *delegatedidentityv1.SubscribeToX509SVIDsResponse) ([]*x509svid.SVID, error) {
	if len(resp.GetX509Svids()) == 0 {
		return nil, nil
	}
	svids := make([]*x509svid.SVID, 0, len(resp.GetX509Svids()))
	for i, sk := range resp.GetX509Svids() {
		svid, err := parseSVID(sk)
		if err != nil {
			return nil, fmt.Errorf("%w: svid %d: %w", ErrMalformed, i, err)
		}
		svids = append(svids, svid)
	}
	return svids, nil
}

func parseSVID(sk *delegatedidentityv1.X509SVIDWithKey) (*x509svid.SVID, error) {
	x := sk.GetX509Svid()
	if x == nil {
		return nil, errors.New("no certificate")
	}
	if len(x.GetCertChain()) == 0 {
		return nil, errors.New("empty certificate chain")
	}
	if len(sk.GetX509SvidKey()) == 0 {
		return nil, errors.New("no private key")
	}
	var der []byte
	for _, c := range x.GetCertChain() {
		der = append(der, c...)
	}
	svid, err := x509svid.ParseRaw(der, sk.GetX509SvidKey())
	if err != nil {
		return nil, err
	}
	if x.GetId() != nil {
		td, err := spiffeid.TrustDomainFromString(x.GetId().GetTrustDomain())
		if err != nil {
			return nil, fmt.Errorf("id: %w", err)
		}
		named, err := spiffeid.FromPath(td, x.GetId().GetPath())
		if err != nil {
			return nil, fmt.Errorf("id: %w", err)
		}
		if named != svid.ID {
			return nil, fmt.Errorf("response names %s but the certificate is %s", named, svid.ID)
		}
	}
	svid.Hint = x.GetHint()
	return svid, nil
}

// parseBundles turns SubscribeToX509BundlesResponse.ca_certificates (trust
// domain ID -> concatenated DER certificates) into a bundle set: the
// agent's own trust domain and every federated one.
func parseBundles(cas map[string][]byte) (*x509bundle.Set, error) {
	if len(cas) == 0 {
		return nil, fmt.Errorf("%w: no bundle", ErrMalformed)
	}
	keys := make([]string, 0, len(cas))
	for k := range cas {
		keys = append(keys, k)
	}
	slices.Sort(keys) // the first bad one is the same on every run
	set := x509bundle.NewSet()
	for _, k := range keys {
		td, err := spiffeid.TrustDomainFromString(k)
		if err != nil {
			return nil, fmt.Errorf("%w: bundle %q: %w", ErrMalformed, k, err)
		}
		certs, err := x509.ParseCertificates(cas[k])
		if err != nil {
			return nil, fmt.Errorf("%w: bundle %s: %w", ErrMalformed, td, err)
		}
		if len(certs) == 0 {
			return nil, fmt.Errorf("%w: bundle %s has no certificate", ErrMalformed, td)
		}
		set.Add(x509bundle.FromX509Authorities(td, certs))
	}
	return set, nil
}
