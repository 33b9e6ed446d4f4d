package devca

import (
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// FuzzLoad feeds arbitrary key and bundle files to the loader: it must
// return an error or a CA that passes every check, never panic.
func FuzzLoad(f *testing.F) {
	dir := filepath.Join(f.TempDir(), "ca")
	ca, err := Open(dir, testTD, Options{Clock: newFakeClock(t0), Logger: quiet()})
	if err != nil {
		f.Fatal(err)
	}
	keyPEM, err := os.ReadFile(filepath.Join(dir, KeyFile))
	if err != nil {
		f.Fatal(err)
	}
	certPEM, err := os.ReadFile(filepath.Join(dir, BundleFile))
	if err != nil {
		f.Fatal(err)
	}
	sec1, err := x509.MarshalECPrivateKey(ca.key)
	if err != nil {
		f.Fatal(err)
	}
	leaf, err := ca.Mint(workloadID(f, testTD, "shop", "web"), time.Hour)
	if err != nil {
		f.Fatal(err)
	}
	f.Add(keyPEM, certPEM)
	f.Add(pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: sec1}), certPEM)
	f.Add(certPEM, keyPEM)
	f.Add(keyPEM, pemCert(leaf.Certificates[0]))
	f.Add([]byte{}, []byte{})
	f.Add([]byte("-----BEGIN PRIVATE KEY-----\n-----END PRIVATE KEY-----\n"), certPEM)

	f.Fuzz(func(t *testing.T, key, bundle []byte) {
		got, err := parseCA(key, bundle, testTD, t0)
		if err != nil {
			return
		}
		c := got.cert
		if !c.IsCA || c.KeyUsage&x509.KeyUsageCertSign == 0 || len(c.URIs) != 1 || c.URIs[0].String() != testTD.IDString() {
			t.Fatalf("accepted a certificate that is not a ca of %s", testTD)
		}
		if !got.key.PublicKey.Equal(c.PublicKey) {
			t.Fatal("accepted a key that does not match")
		}
		if !t0.Before(c.NotAfter) || t0.Before(c.NotBefore) {
			t.Fatal("accepted a ca outside its validity")
		}
	})
}
