package spire

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"net/url"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	delegatedidentityv1 "github.com/spiffe/spire-api-sdk/proto/spire/api/agent/delegatedidentity/v1"
	"github.com/spiffe/spire-api-sdk/proto/spire/api/types"
)

// testCA signs test SVIDs the way a SPIRE server does: a self-signed root
// and leaves with a SPIFFE ID URI SAN.
type testCA struct {
	td   spiffeid.TrustDomain
	cert *x509.Certificate
	key  crypto.Signer
}

func nextSerial(t testing.TB) *big.Int {
	n, err := rand.Int(rand.Reader, big.NewInt(1<<62))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

func newTestCA(t testing.TB, td string) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	id := spiffeid.RequireTrustDomainFromString(td)
	tmpl := &x509.Certificate{
		SerialNumber:          nextSerial(t),
		Subject:               pkix.Name{CommonName: "test ca " + td},
		NotBefore:             time.Now().Add(-time.Minute),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{id.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &testCA{td: id, cert: cert, key: key}
}

// issue returns the DER leaf and the PKCS#8 key of an SVID for id (no URI
// SAN when id is empty).
func (ca *testCA) issue(t testing.TB, id string) (leaf, key []byte) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: nextSerial(t),
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
	}
	if id != "" {
		tmpl.URIs = []*url.URL{spiffeid.RequireFromString(id).URL()}
	}
	leaf, err = x509.CreateCertificate(rand.Reader, tmpl, ca.cert, k.Public(), ca.key)
	if err != nil {
		t.Fatal(err)
	}
	key, err = x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return leaf, key
}

func svidWithKey(id string, chain [][]byte, key []byte) *delegatedidentityv1.X509SVIDWithKey {
	sk := &delegatedidentityv1.X509SVIDWithKey{
		X509Svid:    &types.X509SVID{CertChain: chain, Hint: "h"},
		X509SvidKey: key,
	}
	if id != "" {
		parsed := spiffeid.RequireFromString(id)
		sk.X509Svid.Id = &types.SPIFFEID{TrustDomain: parsed.TrustDomain().Name(), Path: parsed.Path()}
	}
	return sk
}

func TestParseSVIDs(t *testing.T) {
	ca := newTestCA(t, "example.org")
	const idA, idB = "spiffe://example.org/ns/a/sa/x", "spiffe://example.org/custom"
	leafA, keyA := ca.issue(t, idA)
	leafB, keyB := ca.issue(t, idB)
	leafNoID, keyNoID := ca.issue(t, "")

	resp := func(s ...*delegatedidentityv1.X509SVIDWithKey) *delegatedidentityv1.SubscribeToX509SVIDsResponse {
		return &delegatedidentityv1.SubscribeToX509SVIDsResponse{X509Svids: s}
	}
	t.Run("empty response is no svid", func(t *testing.T) {
		svids, err := parseSVIDs(resp())
		if err != nil || svids != nil {
			t.Fatalf("got %v, %v", svids, err)
		}
	})
	t.Run("svids in order, with chain and hint", func(t *testing.T) {
		svids, err := parseSVIDs(resp(
			svidWithKey(idB, [][]byte{leafB, ca.cert.Raw}, keyB),
			svidWithKey(idA, [][]byte{leafA}, keyA),
		))
		if err != nil {
			t.Fatal(err)
		}
		if len(svids) != 2 || svids[0].ID.String() != idB || svids[1].ID.String() != idA {
			t.Fatalf("got %v", svids)
		}
		if len(svids[0].Certificates) != 2 || svids[0].Hint != "h" || svids[0].PrivateKey == nil {
			t.Fatalf("svid 0: %d certs, hint %q", len(svids[0].Certificates), svids[0].Hint)
		}
		// The parsed SVID verifies against its CA's bundle.
		bundle := x509bundle.FromX509Authorities(ca.td, []*x509.Certificate{ca.cert})
		id, _, err := x509svid.Verify(svids[1].Certificates, bundle)
		if err != nil || id.String() != idA {
			t.Fatalf("verify: %v, %v", id, err)
		}
	})
	t.Run("no id field is fine (the certificate says it)", func(t *testing.T) {
		svids, err := parseSVIDs(resp(svidWithKey("", [][]byte{leafA}, keyA)))
		if err != nil || len(svids) != 1 || svids[0].ID.String() != idA {
			t.Fatalf("got %v, %v", svids, err)
		}
	})

	for _, tc := range []struct {
		name string
		sk   *delegatedidentityv1.X509SVIDWithKey
	}{
		{"no certificate", &delegatedidentityv1.X509SVIDWithKey{X509SvidKey: keyA}},
		{"empty chain", svidWithKey(idA, nil, keyA)},
		{"no key", svidWithKey(idA, [][]byte{leafA}, nil)},
		{"key of another svid", svidWithKey(idA, [][]byte{leafA}, keyB)},
		{"garbage certificate", svidWithKey(idA, [][]byte{[]byte("not a certificate")}, keyA)},
		{"garbage key", svidWithKey(idA, [][]byte{leafA}, []byte("not a key"))},
		{"id field differs from the certificate", svidWithKey(idB, [][]byte{leafA}, keyA)},
		{"leaf without spiffe id", svidWithKey(idA, [][]byte{leafNoID}, keyNoID)},
		{"ca as leaf", svidWithKey("", [][]byte{ca.cert.Raw}, keyA)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// A bad one spoils the whole response: a partial set would
			// drop the pod's other SVIDs silently.
			svids, err := parseSVIDs(resp(svidWithKey(idB, [][]byte{leafB}, keyB), tc.sk))
			if !errors.Is(err, ErrMalformed) || svids != nil {
				t.Fatalf("got %v, %v; want ErrMalformed", svids, err)
			}
		})
	}
}

func TestParseBundles(t *testing.T) {
	local := newTestCA(t, "example.org")
	local2 := newTestCA(t, "example.org")
	fed := newTestCA(t, "partner.example")

	set, err := parseBundles(map[string][]byte{
		"spiffe://example.org":     append(append([]byte{}, local.cert.Raw...), local2.cert.Raw...),
		"spiffe://partner.example": fed.cert.Raw,
	})
	if err != nil {
		t.Fatal(err)
	}
	if set.Len() != 2 {
		t.Fatalf("%d bundles, want 2", set.Len())
	}
	b, ok := set.Get(local.td)
	if !ok || len(b.X509Authorities()) != 2 || !b.HasX509Authority(local2.cert) {
		t.Fatalf("local bundle: %v", b)
	}
	if b, ok := set.Get(fed.td); !ok || !b.HasX509Authority(fed.cert) {
		t.Fatalf("federated bundle: %v", b)
	}

	for name, cas := range map[string]map[string][]byte{
		"none":          {},
		"bad trust dom": {"spiffe://Bad Domain": local.cert.Raw},
		"garbage der":   {"spiffe://example.org": []byte("junk")},
		"no cert":       {"spiffe://example.org": nil},
	} {
		t.Run(name, func(t *testing.T) {
			if set, err := parseBundles(cas); !errors.Is(err, ErrMalformed) || set != nil {
				t.Fatalf("got %v, %v; want ErrMalformed", set, err)
			}
		})
	}
}

func TestBackoff(t *testing.T) {
	b := backoff{min: 100 * time.Millisecond, max: time.Second}
	bounds := [][2]time.Duration{{50, 100}, {100, 200}, {200, 400}, {400, 800}, {500, 1000}, {500, 1000}}
	for i, want := range bounds {
		d := b.next()
		if d < want[0]*time.Millisecond || d > want[1]*time.Millisecond {
			t.Fatalf("wait %d = %v, want in [%dms, %dms]", i, d, want[0], want[1])
		}
	}
	b.reset()
	if d := b.next(); d > 100*time.Millisecond {
		t.Fatalf("after reset: %v", d)
	}
}
