package devca

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net/url"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// Errors that callers and tests branch on. Every error Open and Mint return
// wraps at most one of them, with the file and the detail in the message.
var (
	ErrMalformed           = errors.New("malformed ca file")
	ErrNotCA               = errors.New("certificate is not a ca")
	ErrKeyMismatch         = errors.New("ca key does not match the ca certificate")
	ErrWrongTrustDomain    = errors.New("wrong trust domain")
	ErrExpired             = errors.New("ca expired")
	ErrNotYetValid         = errors.New("ca not yet valid")
	ErrInsecurePermissions = errors.New("insecure permissions")
	ErrIncomplete          = errors.New("incomplete ca folder")
	ErrBadTTL              = errors.New("bad svid ttl")
)

const (
	// DefaultLifetime is the lifetime of a CA Open creates.
	DefaultLifetime = 365 * 24 * time.Hour
	// backdate is how far NotBefore lies in the past, so that a peer whose
	// clock is a little behind ours accepts a fresh certificate.
	backdate = 30 * time.Second
	// MinTTL is the shortest SVID lifetime Mint accepts: X.509 times have
	// whole seconds.
	MinTTL = time.Second
)

// Options tune Open. The zero value is fine.
type Options struct {
	// Lifetime of the CA when Open creates it; DefaultLifetime when zero.
	// A loaded CA keeps the lifetime it was made with.
	Lifetime time.Duration
	// Clock for validity checks, minting and rotation; the wall clock when nil.
	Clock Clock
	// Logger; slog.Default() when nil. Keys are never logged.
	Logger *slog.Logger
}

// CA is a loaded development CA. It is safe for concurrent use.
type CA struct {
	td    spiffeid.TrustDomain
	cert  *x509.Certificate
	key   *ecdsa.PrivateKey
	clock Clock
	log   *slog.Logger
}

// Open loads the CA of trust domain td from dir, or creates it there when
// the folder holds none. Two Opens of the same folder, or of copies of it,
// give the same CA; concurrent Opens of one empty folder create only one.
// A folder with a CA of another trust domain, an expired CA, a key that
// others may read, or files that do not parse is refused.
func Open(dir string, td spiffeid.TrustDomain, opts Options) (*CA, error) {
	if td.IsZero() {
		return nil, errors.New("open dev ca: trust domain is empty")
	}
	clock := opts.Clock
	if clock == nil {
		clock = realClock{}
	}
	log := opts.Logger
	if log == nil {
		log = slog.Default()
	}
	lifetime := opts.Lifetime
	if lifetime == 0 {
		lifetime = DefaultLifetime
	}
	if lifetime < time.Minute {
		return nil, fmt.Errorf("open dev ca: lifetime %s is shorter than a minute", lifetime)
	}
	if err := prepareDir(dir); err != nil {
		return nil, fmt.Errorf("open dev ca: %w", err)
	}
	unlock, err := lockDir(dir)
	if err != nil {
		return nil, fmt.Errorf("open dev ca: %w", err)
	}
	defer unlock()

	keyPath, bundlePath := filepath.Join(dir, KeyFile), filepath.Join(dir, BundleFile)
	haveKey, err := exists(keyPath)
	if err != nil {
		return nil, fmt.Errorf("open dev ca: %w", err)
	}
	haveBundle, err := exists(bundlePath)
	if err != nil {
		return nil, fmt.Errorf("open dev ca: %w", err)
	}
	switch {
	case !haveKey && !haveBundle:
		ca, err := create(dir, td, lifetime, clock)
		if err != nil {
			return nil, fmt.Errorf("create dev ca in %s: %w", dir, err)
		}
		ca.log = log
		log.Info("created development ca", "dir", dir, "trust_domain", td.String(),
			"serial", ca.cert.SerialNumber.Text(16), "not_after", ca.cert.NotAfter)
		return ca, nil
	case haveKey != haveBundle:
		// The key is written first and the bundle last, so a crash in
		// between leaves only the key; a partial copy leaves either.
		// Neither is guessed at: a fresh CA would split the nodes.
		return nil, fmt.Errorf("open dev ca: %s has %s=%t and %s=%t (a crashed creation or a partial copy); copy the whole folder or empty it to create a new ca: %w",
			dir, KeyFile, haveKey, BundleFile, haveBundle, ErrIncomplete)
	}

	keyPEM, err := readFile(keyPath, true)
	if err != nil {
		return nil, fmt.Errorf("open dev ca: %w", err)
	}
	certPEM, err := readFile(bundlePath, false)
	if err != nil {
		return nil, fmt.Errorf("open dev ca: %w", err)
	}
	ca, err := parseCA(keyPEM, certPEM, td, clock.Now())
	if err != nil {
		return nil, fmt.Errorf("open dev ca in %s: %w", dir, err)
	}
	ca.clock, ca.log = clock, log
	if left := ca.cert.NotAfter.Sub(clock.Now()); left < 30*24*time.Hour {
		log.Warn("development ca expires soon; svids are capped at its expiry",
			"dir", dir, "not_after", ca.cert.NotAfter, "left", left.Round(time.Minute))
	}
	return ca, nil
}

// create makes a new CA and writes it to dir: key first, bundle last, so
// that the bundle's presence says the folder is complete.
func create(dir string, td spiffeid.TrustDomain, lifetime time.Duration, clock Clock) (*CA, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generate key: %w", err)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, err
	}
	now := clock.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		Subject: pkix.Name{
			Organization: []string{"Bulkhead"},
			CommonName:   "Bulkhead development CA " + td.Name(),
		},
		URIs:                  []*url.URL{td.ID().URL()},
		NotBefore:             now.Add(-backdate).Truncate(time.Second),
		NotAfter:              now.Add(lifetime).Truncate(time.Second),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
		// SVIDs hang directly off this root.
		MaxPathLen:     0,
		MaxPathLenZero: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, fmt.Errorf("self-sign ca certificate: %w", err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("parse new ca certificate: %w", err)
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("marshal ca key: %w", err)
	}
	keyPEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER})
	if err := writeFileAtomic(dir, KeyFile, keyPEM); err != nil {
		return nil, err
	}
	certPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	if err := writeFileAtomic(dir, BundleFile, certPEM); err != nil {
		return nil, err
	}
	return &CA{td: td, cert: cert, key: key, clock: clock}, nil
}

// parseCA validates a key and bundle as Open reads them. It is separate
// from the file handling so that it can be fuzzed.
func parseCA(keyPEM, certPEM []byte, td spiffeid.TrustDomain, now time.Time) (*CA, error) {
	keyDER, err := onePEM(keyPEM, KeyFile, "PRIVATE KEY", "EC PRIVATE KEY")
	if err != nil {
		return nil, err
	}
	certDER, err := onePEM(certPEM, BundleFile, "CERTIFICATE")
	if err != nil {
		return nil, err
	}
	cert, err := x509.ParseCertificate(certDER)
	if err != nil {
		return nil, fmt.Errorf("%s: %w: %w", BundleFile, ErrMalformed, err)
	}
	if !cert.BasicConstraintsValid || !cert.IsCA || cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, fmt.Errorf("%s: %w (want basic constraints CA:true and key usage certSign)", BundleFile, ErrNotCA)
	}
	if err := checkTrustDomain(cert, td); err != nil {
		return nil, err
	}
	if err := cert.CheckSignatureFrom(cert); err != nil {
		return nil, fmt.Errorf("%s: %w: not self-signed: %w", BundleFile, ErrNotCA, err)
	}
	switch {
	case !now.Before(cert.NotAfter):
		return nil, fmt.Errorf("%s: %w on %s; remove the folder's files to create a new ca (every node then needs the new folder)",
			BundleFile, ErrExpired, cert.NotAfter.UTC().Format(time.RFC3339))
	case now.Before(cert.NotBefore):
		return nil, fmt.Errorf("%s: %w until %s (is this clock right?)",
			BundleFile, ErrNotYetValid, cert.NotBefore.UTC().Format(time.RFC3339))
	}

	key, err := parseKey(keyDER)
	if err != nil {
		return nil, err
	}
	pub, ok := cert.PublicKey.(*ecdsa.PublicKey)
	if !ok || !pub.Equal(key.Public()) {
		return nil, fmt.Errorf("%s and %s: %w", KeyFile, BundleFile, ErrKeyMismatch)
	}
	return &CA{td: td, cert: cert, key: key}, nil
}

// onePEM returns the bytes of the one PEM block of the given types that data
// holds, refusing other blocks and trailing text: a bundle of several
// authorities is not a CA this package made.
func onePEM(data []byte, file string, types ...string) ([]byte, error) {
	block, rest := pem.Decode(data)
	if block == nil {
		return nil, fmt.Errorf("%s: no PEM block: %w", file, ErrMalformed)
	}
	if len(bytes.TrimSpace(rest)) != 0 {
		return nil, fmt.Errorf("%s: more than one PEM block or trailing data: %w", file, ErrMalformed)
	}
	for _, t := range types {
		if block.Type == t {
			return block.Bytes, nil
		}
	}
	return nil, fmt.Errorf("%s: PEM block %q, want %q: %w", file, block.Type, types, ErrMalformed)
}

func parseKey(der []byte) (*ecdsa.PrivateKey, error) {
	if k, err := x509.ParsePKCS8PrivateKey(der); err == nil {
		ec, ok := k.(*ecdsa.PrivateKey)
		if !ok {
			return nil, fmt.Errorf("%s: key is %T, want ECDSA: %w", KeyFile, k, ErrMalformed)
		}
		return ec, nil
	}
	ec, err := x509.ParseECPrivateKey(der)
	if err != nil {
		return nil, fmt.Errorf("%s: neither PKCS#8 nor SEC 1 ECDSA key: %w", KeyFile, ErrMalformed)
	}
	return ec, nil
}

// checkTrustDomain insists on exactly one URI SAN, the trust domain's ID.
func checkTrustDomain(cert *x509.Certificate, td spiffeid.TrustDomain) error {
	if len(cert.URIs) != 1 {
		return fmt.Errorf("%s: %d URI SANs, want one (spiffe://%s): %w", BundleFile, len(cert.URIs), td.Name(), ErrNotCA)
	}
	id, err := spiffeid.FromURI(cert.URIs[0])
	if err != nil || id.Path() != "" {
		return fmt.Errorf("%s: URI SAN %q is not a trust domain ID: %w", BundleFile, cert.URIs[0].String(), ErrNotCA)
	}
	if id.TrustDomain() != td {
		return fmt.Errorf("%s: the ca in this folder was made for trust domain %q, not %q; use another folder or --trust-domain %s: %w",
			BundleFile, id.TrustDomain().Name(), td.Name(), id.TrustDomain().Name(), ErrWrongTrustDomain)
	}
	return nil
}

// randomSerial is a positive, non-zero 128-bit serial number.
func randomSerial() (*big.Int, error) {
	limit := new(big.Int).Lsh(big.NewInt(1), 128)
	for {
		n, err := rand.Int(rand.Reader, limit)
		if err != nil {
			return nil, fmt.Errorf("random serial: %w", err)
		}
		if n.Sign() > 0 {
			return n, nil
		}
	}
}

// TrustDomain is the trust domain the CA issues for.
func (c *CA) TrustDomain() spiffeid.TrustDomain { return c.td }

// NotAfter is when the CA, and so every SVID it mints, expires.
func (c *CA) NotAfter() time.Time { return c.cert.NotAfter }

// Bundle returns a fresh bundle of the CA's trust domain that holds the CA
// certificate; callers may change it.
func (c *CA) Bundle() *x509bundle.Bundle {
	return x509bundle.FromX509Authorities(c.td, []*x509.Certificate{c.cert})
}

// Mint issues an X.509-SVID for id, which must be in the CA's trust domain,
// with a fresh P-256 key that exists only in the returned SVID. It is valid
// from a little before now to now+ttl, or to the CA's own expiry if that
// comes first. The chain holds the leaf only: the CA is the bundle's root.
func (c *CA) Mint(id spiffeid.ID, ttl time.Duration) (*x509svid.SVID, error) {
	if id.IsZero() {
		return nil, errors.New("mint svid: empty spiffe id")
	}
	if !id.MemberOf(c.td) {
		return nil, fmt.Errorf("mint svid for %s: not in trust domain %q of the dev ca: %w", id, c.td.Name(), ErrWrongTrustDomain)
	}
	if id.Path() == "" {
		// The bare trust domain names the CA, never a workload.
		return nil, fmt.Errorf("mint svid for %s: the trust domain's own id is not a workload id", id)
	}
	if ttl < MinTTL {
		return nil, fmt.Errorf("mint svid for %s: ttl %s is below %s: %w", id, ttl, MinTTL, ErrBadTTL)
	}
	now := c.clock.Now()
	if !now.Before(c.cert.NotAfter) {
		return nil, fmt.Errorf("mint svid for %s: %w on %s", id, ErrExpired, c.cert.NotAfter.UTC().Format(time.RFC3339))
	}
	notBefore := now.Add(-backdate).Truncate(time.Second)
	if notBefore.Before(c.cert.NotBefore) {
		notBefore = c.cert.NotBefore
	}
	// X.509 times have whole seconds: round the end up, so that an SVID
	// lives at least ttl (a rounded-down 1 s SVID could be born expired).
	notAfter := now.Add(ttl)
	if t := notAfter.Truncate(time.Second); !t.Equal(notAfter) {
		notAfter = t.Add(time.Second)
	}
	if notAfter.After(c.cert.NotAfter) {
		notAfter = c.cert.NotAfter
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("mint svid for %s: generate key: %w", id, err)
	}
	serial, err := randomSerial()
	if err != nil {
		return nil, fmt.Errorf("mint svid for %s: %w", id, err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{"Bulkhead"}},
		URIs:                  []*url.URL{id.URL()},
		NotBefore:             notBefore,
		NotAfter:              notAfter,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment | x509.KeyUsageKeyAgreement,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		IsCA:                  false,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.cert, &key.PublicKey, c.key)
	if err != nil {
		return nil, fmt.Errorf("mint svid for %s: sign: %w", id, err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		return nil, fmt.Errorf("mint svid for %s: parse: %w", id, err)
	}
	return &x509svid.SVID{ID: id, Certificates: []*x509.Certificate{leaf}, PrivateKey: key}, nil
}
