package spire

import (
	"bytes"
	"crypto"
	"crypto/x509"
	"log/slog"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	delegatedidentityv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/delegatedidentity/v1"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"

	"github.com/bulkhead-io/bulkhead/identity/devca"
)

// fuzzTD is the trust domain of the seeds: the fuzzer also tries others.
const fuzzTD = "fuzz.test"

// fuzzSeed is one valid SVID, as SPIRE would send it, and its CA.
type fuzzSeed struct {
	id    spiffeid.ID
	leaf  []byte // DER
	key   []byte // PKCS#8
	caDER []byte
}

// newFuzzSeed mints a real SVID with the development CA, so that the
// fuzzer starts from input that parses and mutates from there.
func newFuzzSeed(f *testing.F) fuzzSeed {
	f.Helper()
	td := spiffeid.RequireTrustDomainFromString(fuzzTD)
	ca, err := devca.Open(filepath.Join(f.TempDir(), "ca"), td, devca.Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		f.Fatal(err)
	}
	id := spiffeid.RequireFromPath(td, "/ns/web/sa/b1")
	svid, err := ca.Mint(id, time.Hour)
	if err != nil {
		f.Fatal(err)
	}
	key, err := x509.MarshalPKCS8PrivateKey(svid.PrivateKey)
	if err != nil {
		f.Fatal(err)
	}
	root := ca.Bundle().X509Authorities()[0]
	return fuzzSeed{id: id, leaf: svid.Certificates[0].Raw, key: key, caDER: root.Raw}
}

// FuzzParseSVIDs feeds arbitrary certificate chains, keys and named IDs to
// parseSVIDs: it must return an error or SVIDs that are what they claim,
// never panic.
func FuzzParseSVIDs(f *testing.F) {
	s := newFuzzSeed(f)
	td, path := s.id.TrustDomain().Name(), s.id.Path()
	chain := append(bytes.Clone(s.leaf), s.caDER...)
	// chain, split (where the chain is cut into two certificates of the
	// response), key, named trust domain and path, whether an ID is
	// named at all, hint.
	f.Add(s.leaf, uint16(0), s.key, td, path, true, "h")
	f.Add(chain, uint16(len(s.leaf)), s.key, td, path, true, "")
	f.Add(s.leaf, uint16(0), s.key, "", "", false, "")
	f.Add(s.leaf, uint16(0), s.key, "other.test", path, true, "")
	f.Add(s.leaf, uint16(0), s.key, td, "/ns/web/sa/b2", true, "")
	f.Add(s.caDER, uint16(0), s.key, td, "", true, "")
	f.Add(s.leaf[:len(s.leaf)/2], uint16(0), s.key[:len(s.key)/2], td, path, true, "")
	f.Add([]byte{}, uint16(0), []byte{}, "", "", true, "")

	f.Fuzz(func(t *testing.T, der []byte, split uint16, key []byte, namedTD, namedPath string, named bool, hint string) {
		certs := [][]byte{der}
		if n := int(split); n > 0 && n < len(der) {
			certs = [][]byte{der[:n], der[n:]}
		}
		sk := &delegatedidentityv1.X509SVIDWithKey{
			X509Svid:    &types.X509SVID{CertChain: certs, Hint: hint},
			X509SvidKey: key,
		}
		if named {
			sk.X509Svid.Id = &types.SPIFFEID{TrustDomain: namedTD, Path: namedPath}
		}
		svids, err := parseSVIDs(&delegatedidentityv1.SubscribeToX509SVIDsResponse{X509Svids: []*delegatedidentityv1.X509SVIDWithKey{sk}})
		if err != nil {
			if svids != nil {
				t.Fatalf("error %v with svids %v", err, svids)
			}
			return
		}
		if len(svids) != 1 {
			t.Fatalf("one svid sent, %d parsed", len(svids))
		}
		checkFuzzedSVID(t, svids[0])
		if named {
			if svids[0].ID.TrustDomain().Name() != namedTD || svids[0].ID.Path() != namedPath {
				t.Fatalf("response names %q %q, parsed %s", namedTD, namedPath, svids[0].ID)
			}
		}
		if svids[0].Hint != hint {
			t.Fatalf("hint %q, parsed %q", hint, svids[0].Hint)
		}
	})
}

// checkFuzzedSVID fails t unless svid has an ID that is its leaf's only URI
// SAN and a private key that matches the leaf.
func checkFuzzedSVID(t *testing.T, svid *x509svid.SVID) {
	t.Helper()
	if svid.ID.IsZero() {
		t.Fatal("svid without an ID")
	}
	if len(svid.Certificates) == 0 {
		t.Fatalf("svid %s without a certificate", svid.ID)
	}
	leaf := svid.Certificates[0]
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != svid.ID.String() {
		t.Fatalf("svid %s: leaf URI SANs %v", svid.ID, leaf.URIs)
	}
	if leaf.IsCA {
		t.Fatalf("svid %s: leaf is a CA", svid.ID)
	}
	pub, ok := svid.PrivateKey.Public().(interface{ Equal(crypto.PublicKey) bool })
	if !ok || !pub.Equal(leaf.PublicKey) {
		t.Fatalf("svid %s: private key does not match the leaf", svid.ID)
	}
}

// FuzzParseBundles feeds arbitrary trust domain names and certificate
// bytes to parseBundles: it must return an error or a set with exactly the
// bundles sent, never panic.
func FuzzParseBundles(f *testing.F) {
	s := newFuzzSeed(f)
	two := append(bytes.Clone(s.caDER), s.leaf...)
	// Two entries of the response's map: trust domain and DER each.
	f.Add(fuzzTD, s.caDER, "", []byte(nil))
	f.Add(fuzzTD, s.caDER, "federated.test", two)
	f.Add("spiffe://"+fuzzTD, s.caDER, fuzzTD, s.caDER)
	f.Add(fuzzTD, s.caDER[:len(s.caDER)-1], "", []byte(nil))
	f.Add("Bad TD", s.caDER, "", []byte(nil))
	f.Add(fuzzTD, []byte{}, "", []byte(nil))

	f.Fuzz(func(t *testing.T, td1 string, der1 []byte, td2 string, der2 []byte) {
		cas := map[string][]byte{td1: der1}
		if td2 != "" {
			cas[td2] = der2
		}
		set, err := parseBundles(cas)
		if err != nil {
			if set != nil {
				t.Fatalf("error %v with a set", err)
			}
			return
		}
		// Two keys may name one trust domain ("x" and "spiffe://x"):
		// the set then holds one of the two bundles.
		sent := map[spiffeid.TrustDomain][][]byte{}
		for k, der := range cas {
			td, err := spiffeid.TrustDomainFromString(k)
			if err != nil {
				t.Fatalf("accepted trust domain %q: %v", k, err)
			}
			sent[td] = append(sent[td], der)
		}
		if set.Len() != len(sent) {
			t.Fatalf("%d trust domains sent, %d in the set", len(sent), set.Len())
		}
		for td, ders := range sent {
			b, ok := set.Get(td)
			if !ok {
				t.Fatalf("no bundle for %s", td)
			}
			if !slices.ContainsFunc(ders, func(der []byte) bool { return sameCerts(t, td, der, b.X509Authorities()) }) {
				t.Fatalf("%s: the bundle is none of the ones sent", td)
			}
		}
	})
}

// sameCerts reports whether got are the certificates of der, failing t if
// der was accepted although it holds none.
func sameCerts(t *testing.T, td spiffeid.TrustDomain, der []byte, got []*x509.Certificate) bool {
	t.Helper()
	want, err := x509.ParseCertificates(der)
	if err != nil || len(want) == 0 {
		t.Fatalf("accepted %d bytes for %s that are no certificates (%v)", len(der), td, err)
	}
	return slices.EqualFunc(got, want, (*x509.Certificate).Equal)
}
