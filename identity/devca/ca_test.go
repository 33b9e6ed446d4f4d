package devca

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

var (
	testTD  = spiffeid.RequireTrustDomainFromString("example.org")
	otherTD = spiffeid.RequireTrustDomainFromString("other.example")
	// t0 has a fraction of a second, to catch rounding of X.509 times.
	t0 = time.Date(2026, 3, 1, 12, 0, 0, 700_000_000, time.UTC)
)

func quiet() *slog.Logger { return slog.New(slog.DiscardHandler) }

func workloadID(t testing.TB, td spiffeid.TrustDomain, ns, sa string) spiffeid.ID {
	t.Helper()
	id, err := spiffeid.FromSegments(td, "ns", ns, "sa", sa)
	if err != nil {
		t.Fatal(err)
	}
	return id
}

// openAt opens the CA in dir with a fake clock at now.
func openAt(t testing.TB, dir string, td spiffeid.TrustDomain, now time.Time, lifetime time.Duration) (*CA, *fakeClock) {
	t.Helper()
	clock := newFakeClock(now)
	ca, err := Open(dir, td, Options{Clock: clock, Logger: quiet(), Lifetime: lifetime})
	if err != nil {
		t.Fatalf("open %s: %v", dir, err)
	}
	return ca, clock
}

func mode(t *testing.T, path string) fs.FileMode {
	t.Helper()
	st, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return st.Mode().Perm()
}

func TestOpenCreatesThenLoads(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "nested", "ca")
	ca, _ := openAt(t, dir, testTD, t0, 0)

	if m := mode(t, dir); m != 0o700 {
		t.Errorf("folder mode %04o, want 0700", m)
	}
	for _, f := range []string{KeyFile, BundleFile} {
		if m := mode(t, filepath.Join(dir, f)); m != 0o600 {
			t.Errorf("%s mode %04o, want 0600", f, m)
		}
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), ".tmp") {
			t.Errorf("temporary file %s left behind", e.Name())
		}
	}

	c := ca.cert
	if !c.IsCA || !c.BasicConstraintsValid || c.KeyUsage != x509.KeyUsageCertSign|x509.KeyUsageCRLSign {
		t.Errorf("ca cert: IsCA=%t BasicConstraintsValid=%t KeyUsage=%v", c.IsCA, c.BasicConstraintsValid, c.KeyUsage)
	}
	if len(c.URIs) != 1 || c.URIs[0].String() != "spiffe://example.org" {
		t.Errorf("ca URI SANs %v, want [spiffe://example.org]", c.URIs)
	}
	if want := t0.Add(DefaultLifetime).Truncate(time.Second); !c.NotAfter.Equal(want) {
		t.Errorf("ca NotAfter %s, want %s", c.NotAfter, want)
	}
	if !c.NotBefore.Before(t0) {
		t.Errorf("ca NotBefore %s is not before its creation %s", c.NotBefore, t0)
	}
	if c.PublicKeyAlgorithm != x509.ECDSA || ca.key.Curve.Params().Name != "P-256" {
		t.Errorf("ca key %v %s, want ECDSA P-256", c.PublicKeyAlgorithm, ca.key.Curve.Params().Name)
	}

	again, _ := openAt(t, dir, testTD, t0.Add(time.Hour), 0)
	if !bytes.Equal(again.cert.Raw, ca.cert.Raw) || !again.key.Equal(ca.key) {
		t.Fatal("second Open of the folder gave another CA")
	}
	if !again.Bundle().Equal(ca.Bundle()) {
		t.Fatal("bundles differ")
	}
}

func copyDir(t *testing.T, from, to string) {
	t.Helper()
	if err := os.MkdirAll(to, 0o700); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{KeyFile, BundleFile} {
		data, err := os.ReadFile(filepath.Join(from, f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(to, f), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

func TestCopiedFolderSharesCA(t *testing.T) {
	nodeA := filepath.Join(t.TempDir(), "a")
	nodeB := filepath.Join(t.TempDir(), "b")
	caA, _ := openAt(t, nodeA, testTD, t0, 0)
	copyDir(t, nodeA, nodeB)
	caB, _ := openAt(t, nodeB, testTD, t0, 0)
	caB2, _ := openAt(t, nodeB, testTD, t0, 0)

	for _, c := range []*CA{caB, caB2} {
		if !bytes.Equal(c.cert.Raw, caA.cert.Raw) || !c.key.Equal(caA.key) {
			t.Fatal("the copy holds another CA")
		}
	}
	// An SVID minted on node B is trusted on node A, and back.
	id := workloadID(t, testTD, "shop", "web")
	for _, pair := range []struct{ mint, verify *CA }{{caB, caA}, {caA, caB}} {
		svid, err := pair.mint.Mint(id, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		if _, _, err := x509svid.Verify(svid.Certificates, pair.verify.Bundle(), x509svid.WithTime(t0)); err != nil {
			t.Fatalf("svid of one node not trusted by the other: %v", err)
		}
	}
}

// TestConcurrentOpenCreatesOneCA opens one empty folder from several
// goroutines: flock locks belong to open files, so they exclude each other
// within a process as between processes.
func TestConcurrentOpenCreatesOneCA(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	const n = 8
	cas := make([]*CA, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			cas[i], errs[i] = Open(dir, testTD, Options{Logger: quiet()})
		})
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("open %d: %v", i, errs[i])
		}
		if !bytes.Equal(cas[i].cert.Raw, cas[0].cert.Raw) {
			t.Fatalf("open %d returned another CA than open 0", i)
		}
	}
}

// TestHelperOpen is the child of TestConcurrentOpenAcrossProcesses.
func TestHelperOpen(t *testing.T) {
	dir := os.Getenv("DEVCA_TEST_HELPER_DIR")
	if dir == "" {
		t.Skip("helper process only")
	}
	ca, err := Open(dir, testTD, Options{Logger: quiet()})
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(ca.cert.Raw)
	fmt.Printf("CA=%s\n", hex.EncodeToString(sum[:]))
}

func TestConcurrentOpenAcrossProcesses(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	const n = 4
	cmds := make([]*exec.Cmd, n)
	outs := make([]bytes.Buffer, n)
	for i := range n {
		cmds[i] = exec.Command(os.Args[0], "-test.run=^TestHelperOpen$", "-test.count=1")
		cmds[i].Env = append(os.Environ(), "DEVCA_TEST_HELPER_DIR="+dir)
		cmds[i].Stdout = &outs[i]
		cmds[i].Stderr = &outs[i]
	}
	for i := range n {
		if err := cmds[i].Start(); err != nil {
			t.Fatal(err)
		}
	}
	seen := map[string]bool{}
	for i := range n {
		if err := cmds[i].Wait(); err != nil {
			t.Fatalf("helper %d: %v\n%s", i, err, outs[i].String())
		}
		_, after, ok := strings.Cut(outs[i].String(), "CA=")
		if !ok {
			t.Fatalf("helper %d printed no CA:\n%s", i, outs[i].String())
		}
		seen[strings.Fields(after)[0]] = true
	}
	if len(seen) != 1 {
		t.Fatalf("%d processes opening one empty folder made %d CAs", n, len(seen))
	}
	ca, _ := openAt(t, dir, testTD, time.Now(), 0)
	sum := sha256.Sum256(ca.cert.Raw)
	if !seen[hex.EncodeToString(sum[:])] {
		t.Fatal("the folder holds another CA than the processes reported")
	}
}

func pemCert(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}

func pemKey(t *testing.T, key any) []byte {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

func TestOpenRefuses(t *testing.T) {
	// A foreign CA and a leaf give mismatching and non-CA material.
	foreign, _ := openAt(t, filepath.Join(t.TempDir(), "foreign"), testTD, t0, 0)
	leaf, err := foreign.Mint(workloadID(t, testTD, "a", "b"), time.Hour)
	if err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name    string
		breakIt func(t *testing.T, dir string)
		td      spiffeid.TrustDomain
		now     time.Time
		want    error
		msg     string // a part of the message a user needs
	}{
		{name: "wrong trust domain", td: otherTD, want: ErrWrongTrustDomain,
			msg: `made for trust domain "example.org", not "other.example"`},
		{name: "key readable by group", want: ErrInsecurePermissions, msg: "0640",
			breakIt: func(t *testing.T, dir string) { chmod(t, filepath.Join(dir, KeyFile), 0o640) }},
		{name: "key readable by others", want: ErrInsecurePermissions, msg: "0604",
			breakIt: func(t *testing.T, dir string) { chmod(t, filepath.Join(dir, KeyFile), 0o604) }},
		{name: "folder writable by others", want: ErrInsecurePermissions, msg: "0777",
			breakIt: func(t *testing.T, dir string) { chmod(t, dir, 0o777) }},
		{name: "expired", now: t0.Add(DefaultLifetime + time.Second), want: ErrExpired, msg: "expired"},
		{name: "not yet valid", now: t0.Add(-time.Hour), want: ErrNotYetValid},
		{name: "garbage bundle", want: ErrMalformed, msg: BundleFile,
			breakIt: func(t *testing.T, dir string) { write(t, dir, BundleFile, []byte("hello")) }},
		{name: "garbage key", want: ErrMalformed, msg: KeyFile,
			breakIt: func(t *testing.T, dir string) {
				write(t, dir, KeyFile, []byte("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"))
			}},
		{name: "truncated bundle", want: ErrMalformed,
			breakIt: func(t *testing.T, dir string) {
				data := read(t, dir, BundleFile)
				write(t, dir, BundleFile, data[:len(data)/2])
			}},
		{name: "truncated certificate DER", want: ErrMalformed,
			breakIt: func(t *testing.T, dir string) {
				b, _ := pem.Decode(read(t, dir, BundleFile))
				b.Bytes = b.Bytes[:len(b.Bytes)-10]
				write(t, dir, BundleFile, pem.EncodeToMemory(b))
			}},
		{name: "bad self-signature", want: ErrNotCA, msg: "not self-signed",
			breakIt: func(t *testing.T, dir string) {
				// The last byte is in the signature's s.
				b, _ := pem.Decode(read(t, dir, BundleFile))
				b.Bytes[len(b.Bytes)-1] ^= 0x01
				write(t, dir, BundleFile, pem.EncodeToMemory(b))
			}},
		{name: "two certificates", want: ErrMalformed, msg: "more than one",
			breakIt: func(t *testing.T, dir string) {
				write(t, dir, BundleFile, append(read(t, dir, BundleFile), pemCert(foreign.cert)...))
			}},
		{name: "key of another ca", want: ErrKeyMismatch,
			breakIt: func(t *testing.T, dir string) { write(t, dir, KeyFile, pemKey(t, foreign.key)) }},
		{name: "leaf instead of ca", want: ErrNotCA,
			breakIt: func(t *testing.T, dir string) {
				write(t, dir, BundleFile, pemCert(leaf.Certificates[0]))
				write(t, dir, KeyFile, pemKey(t, leaf.PrivateKey))
			}},
		{name: "bundle missing", want: ErrIncomplete, msg: "copy the whole folder",
			breakIt: func(t *testing.T, dir string) { remove(t, dir, BundleFile) }},
		{name: "key missing", want: ErrIncomplete,
			breakIt: func(t *testing.T, dir string) { remove(t, dir, KeyFile) }},
		{name: "key owned by another user", want: ErrInsecurePermissions, msg: "owned by uid 4242",
			breakIt: func(t *testing.T, dir string) {
				if os.Geteuid() != 0 {
					t.Skip("chown needs root")
				}
				if err := os.Chown(filepath.Join(dir, KeyFile), 4242, 4242); err != nil {
					t.Fatal(err)
				}
			}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "ca")
			openAt(t, dir, testTD, t0, 0)
			if tt.breakIt != nil {
				tt.breakIt(t, dir)
			}
			before := snapshot(t, dir)
			td, now := testTD, t0
			if !tt.td.IsZero() {
				td = tt.td
			}
			if !tt.now.IsZero() {
				now = tt.now
			}
			ca, err := Open(dir, td, Options{Clock: newFakeClock(now), Logger: quiet()})
			if err == nil {
				t.Fatalf("Open accepted the folder: CA %s", ca.cert.Subject)
			}
			if !errors.Is(err, tt.want) {
				t.Fatalf("error %q does not wrap %q", err, tt.want)
			}
			if !strings.Contains(err.Error(), tt.msg) {
				t.Errorf("error %q does not say %q", err, tt.msg)
			}
			if after := snapshot(t, dir); after != before {
				t.Errorf("a refused Open changed the folder:\nbefore %s\nafter  %s", before, after)
			}
		})
	}
}

func chmod(t *testing.T, path string, m fs.FileMode) {
	t.Helper()
	if err := os.Chmod(path, m); err != nil {
		t.Fatal(err)
	}
}

func write(t *testing.T, dir, name string, data []byte) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
		t.Fatal(err)
	}
}

func read(t *testing.T, dir, name string) []byte {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(dir, name))
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func remove(t *testing.T, dir, name string) {
	t.Helper()
	if err := os.Remove(filepath.Join(dir, name)); err != nil {
		t.Fatal(err)
	}
}

// snapshot describes the CA files of dir, to see that nothing rewrote them.
func snapshot(t *testing.T, dir string) string {
	t.Helper()
	var b strings.Builder
	for _, f := range []string{KeyFile, BundleFile} {
		data, err := os.ReadFile(filepath.Join(dir, f))
		if errors.Is(err, fs.ErrNotExist) {
			fmt.Fprintf(&b, "%s:absent ", f)
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		sum := sha256.Sum256(data)
		fmt.Fprintf(&b, "%s:%x ", f, sum[:6])
	}
	return b.String()
}

func TestMintVerifies(t *testing.T) {
	ca, _ := openAt(t, filepath.Join(t.TempDir(), "ca"), testTD, t0, 0)
	serials := map[string]bool{}
	var keys []crypto.PublicKey
	for _, id := range []spiffeid.ID{
		workloadID(t, testTD, "shop", "web"),
		workloadID(t, testTD, "shop", "web"),
		workloadID(t, testTD, "kube-system", "default"),
	} {
		const ttl = 90 * time.Minute
		svid, err := ca.Mint(id, ttl)
		if err != nil {
			t.Fatalf("mint %s: %v", id, err)
		}
		got, chains, err := x509svid.Verify(svid.Certificates, ca.Bundle(), x509svid.WithTime(t0))
		if err != nil {
			t.Fatalf("verify %s: %v", id, err)
		}
		if got != id || svid.ID != id || len(chains) != 1 {
			t.Errorf("verified id %s (svid.ID %s, %d chains), want %s", got, svid.ID, len(chains), id)
		}
		// go-spiffe's own SVID checks: key matches, key usages, no CA bit.
		certPEM, keyPEM, err := svid.Marshal()
		if err != nil {
			t.Fatal(err)
		}
		if _, err := x509svid.Parse(certPEM, keyPEM); err != nil {
			t.Errorf("go-spiffe refuses the svid: %v", err)
		}

		leaf := svid.Certificates[0]
		if len(svid.Certificates) != 1 {
			t.Errorf("chain of %d certificates, want the leaf only", len(svid.Certificates))
		}
		if len(leaf.URIs) != 1 || leaf.URIs[0].String() != id.String() {
			t.Errorf("URI SANs %v, want [%s]", leaf.URIs, id)
		}
		if leaf.IsCA || !leaf.BasicConstraintsValid {
			t.Errorf("IsCA=%t BasicConstraintsValid=%t", leaf.IsCA, leaf.BasicConstraintsValid)
		}
		if want := x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment | x509.KeyUsageKeyAgreement; leaf.KeyUsage != want {
			t.Errorf("KeyUsage %v, want %v", leaf.KeyUsage, want)
		}
		if len(leaf.ExtKeyUsage) != 2 || leaf.ExtKeyUsage[0] != x509.ExtKeyUsageServerAuth || leaf.ExtKeyUsage[1] != x509.ExtKeyUsageClientAuth {
			t.Errorf("ExtKeyUsage %v, want server and client auth", leaf.ExtKeyUsage)
		}
		if leaf.SerialNumber.Sign() <= 0 || leaf.SerialNumber.BitLen() > 128 || serials[leaf.SerialNumber.String()] {
			t.Errorf("serial %s: not positive, over 128 bits or repeated", leaf.SerialNumber)
		}
		serials[leaf.SerialNumber.String()] = true
		if !leaf.NotBefore.Before(t0) || leaf.NotBefore.Before(t0.Add(-time.Minute)) {
			t.Errorf("NotBefore %s, want a little before %s", leaf.NotBefore, t0)
		}
		// Rounded up to whole seconds: at least ttl, less than a second more.
		if life := leaf.NotAfter.Sub(t0); life < ttl || life >= ttl+time.Second {
			t.Errorf("NotAfter %s is %s after now, want [%s, %s+1s)", leaf.NotAfter, life, ttl, ttl)
		}
		for _, k := range keys {
			if svid.PrivateKey.Public().(*ecdsa.PublicKey).Equal(k) {
				t.Error("two svids share a key")
			}
		}
		keys = append(keys, svid.PrivateKey.Public())
	}
}

func TestMintRefuses(t *testing.T) {
	ca, _ := openAt(t, filepath.Join(t.TempDir(), "ca"), testTD, t0, 0)
	if _, err := ca.Mint(workloadID(t, otherTD, "shop", "web"), time.Hour); !errors.Is(err, ErrWrongTrustDomain) {
		t.Errorf("mint in another trust domain: %v, want %v", err, ErrWrongTrustDomain)
	}
	if _, err := ca.Mint(spiffeid.ID{}, time.Hour); err == nil {
		t.Error("minted an empty id")
	}
	if _, err := ca.Mint(testTD.ID(), time.Hour); err == nil {
		t.Error("minted the trust domain's own id")
	}
	if _, err := ca.Mint(workloadID(t, testTD, "shop", "web"), 999*time.Millisecond); !errors.Is(err, ErrBadTTL) {
		t.Errorf("mint with ttl below a second: %v, want %v", err, ErrBadTTL)
	}
}

func TestMintStaysInsideCALifetime(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "ca")
	ca, clock := openAt(t, dir, testTD, t0, 2*time.Hour)
	id := workloadID(t, testTD, "shop", "web")

	// Capped at the CA's expiry.
	svid, err := ca.Mint(id, 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if got := svid.Certificates[0].NotAfter; !got.Equal(ca.NotAfter()) {
		t.Errorf("NotAfter %s, want the ca's %s", got, ca.NotAfter())
	}

	// Backdating stops at the CA's NotBefore (a node whose clock is a bit
	// behind the creator's).
	early, _ := openAt(t, dir, testTD, ca.cert.NotBefore.Add(5*time.Second), 0)
	svid, err = early.Mint(id, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if got := svid.Certificates[0].NotBefore; !got.Equal(ca.cert.NotBefore) {
		t.Errorf("NotBefore %s, want the ca's %s", got, ca.cert.NotBefore)
	}

	clock.Set(ca.NotAfter())
	if _, err := ca.Mint(id, time.Hour); !errors.Is(err, ErrExpired) {
		t.Errorf("mint after the ca expired: %v, want %v", err, ErrExpired)
	}
}

func TestExpiredSVIDFailsVerification(t *testing.T) {
	ca, _ := openAt(t, filepath.Join(t.TempDir(), "ca"), testTD, t0, 0)
	svid, err := ca.Mint(workloadID(t, testTD, "shop", "web"), time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	notAfter := svid.Certificates[0].NotAfter
	if _, _, err := x509svid.Verify(svid.Certificates, ca.Bundle(), x509svid.WithTime(notAfter.Add(-time.Second))); err != nil {
		t.Fatalf("svid not valid a second before it expires: %v", err)
	}
	if _, _, err := x509svid.Verify(svid.Certificates, ca.Bundle(), x509svid.WithTime(notAfter.Add(time.Second))); err == nil {
		t.Fatal("an expired svid verified")
	}
	if _, _, err := x509svid.Verify(svid.Certificates, ca.Bundle(), x509svid.WithTime(t0.Add(-time.Hour))); err == nil {
		t.Fatal("an svid verified before its NotBefore")
	}
}

func TestForeignCASVIDFailsVerification(t *testing.T) {
	ours, _ := openAt(t, filepath.Join(t.TempDir(), "ours"), testTD, t0, 0)
	sameTD, _ := openAt(t, filepath.Join(t.TempDir(), "same-td"), testTD, t0, 0)
	otherDomain, _ := openAt(t, filepath.Join(t.TempDir(), "other-td"), otherTD, t0, 0)

	svid, err := sameTD.Mint(workloadID(t, testTD, "shop", "web"), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := x509svid.Verify(svid.Certificates, ours.Bundle(), x509svid.WithTime(t0)); err == nil {
		t.Error("an svid of another CA of our trust domain verified against our bundle")
	}
	svid, err = otherDomain.Mint(workloadID(t, otherTD, "shop", "web"), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	set := x509bundle.NewSet(ours.Bundle())
	if _, _, err := x509svid.Verify(svid.Certificates, set, x509svid.WithTime(t0)); err == nil {
		t.Error("an svid of another trust domain verified against our bundle")
	}
}

func BenchmarkMint(b *testing.B) {
	ca, err := Open(filepath.Join(b.TempDir(), "ca"), testTD, Options{Logger: quiet()})
	if err != nil {
		b.Fatal(err)
	}
	id := workloadID(b, testTD, "shop", "web")
	b.ReportAllocs()
	for b.Loop() {
		if _, err := ca.Mint(id, time.Hour); err != nil {
			b.Fatal(err)
		}
	}
}
