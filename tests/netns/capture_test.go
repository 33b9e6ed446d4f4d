package netns

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"io"
	"math/big"
	"net"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/bulkhead-io/bulkhead/tests/privileged"
)

// TestCapture: a capture on one end of a veth pair sees a plaintext TCP
// exchange (its payload, its ports, no TLS), in IPv4 and IPv6, and sees a
// TLS exchange as TLS records that never show the payload; frames sent
// after Stop are not recorded.
func TestCapture(t *testing.T) {
	privileged.Require(t)
	a, b := New(t), New(t)
	Veth(t, a, "cap0", b, "cap1")
	Addr(t, a, "cap0", "10.213.251.1/24", "fd00:213:251::1/64")
	Addr(t, b, "cap1", "10.213.251.2/24", "fd00:213:251::2/64")
	c := StartCapture(t, a.NetNS, "cap0")

	// Plaintext, both families, to an echo server in b.
	ServeEcho(t, b.NetNS, 7100, "4", "6")
	payloads := map[netip.Addr][]byte{
		netip.MustParseAddr("10.213.251.2"):    []byte("capture-plain-v4-7f3a9c"),
		netip.MustParseAddr("fd00:213:251::2"): []byte("capture-plain-v6-51be0d"),
	}
	for to, payload := range payloads {
		conn, err := Dial(a.NetNS, "tcp", to, 7100, 5*time.Second)
		if err != nil {
			t.Fatalf("dial %s: %v", to, err)
		}
		if _, err := conn.Write(payload); err != nil {
			t.Fatal(err)
		}
		got := make([]byte, len(payload))
		_ = conn.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := io.ReadFull(conn, got); err != nil || !bytes.Equal(got, payload) {
			t.Fatalf("echo from %s: %q, %v", to, got, err)
		}
		conn.Close()
	}

	// TLS on another port, with a payload that must not appear.
	secret := []byte("capture-secret-payload-0d41e2")
	var ln net.Listener
	b.Do(t, func() error {
		var err error
		ln, err = tls.Listen("tcp4", "10.213.251.2:7443", &tls.Config{Certificates: []tls.Certificate{selfSigned(t)}})
		return err
	})
	t.Cleanup(func() { ln.Close() })
	go func() {
		s, err := ln.Accept()
		if err != nil {
			return
		}
		defer s.Close()
		_, _ = io.Copy(s, s)
	}()
	raw, err := Dial(a.NetNS, "tcp4", netip.MustParseAddr("10.213.251.2"), 7443, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	tc := tls.Client(raw, &tls.Config{InsecureSkipVerify: true, MinVersion: tls.VersionTLS13})
	_ = tc.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := tc.Write(secret); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(secret))
	if _, err := io.ReadFull(tc, got); err != nil {
		t.Fatal(err)
	}
	tc.Close()

	// Frames may still be in the socket's queue: Stop drains it.
	c.Stop()
	if err := c.Err(); err != nil {
		t.Fatalf("capture: %v", err)
	}
	for to, payload := range payloads {
		if !c.Contains(payload) {
			t.Errorf("capture lacks the plaintext payload sent to %s", to)
		}
		var syn, data bool
		for _, s := range c.Segments() {
			if s.Dst == netip.AddrPortFrom(to, 7100) && s.Has(TCPSyn) && !s.Has(TCPAck) {
				syn = true
			}
			if s.Dst == netip.AddrPortFrom(to, 7100) && bytes.Equal(s.Payload, payload) {
				data = true
			}
		}
		if !syn || !data {
			t.Errorf("no SYN (%v) or data segment (%v) to %s:7100 among %d segments", syn, data, to, len(c.Segments()))
		}
	}
	if ports := c.TCPPorts(); !slices.Contains(ports, 7100) || !slices.Contains(ports, 7443) {
		t.Errorf("TCP ports seen %v, want 7100 and 7443 among them", ports)
	}
	if ports := c.PayloadPorts(); !slices.Contains(ports, 7100) {
		t.Errorf("ports with data %v lack 7100", ports)
	}
	if c.LooksLikeTLS(7100) {
		t.Error("plaintext on 7100 taken for TLS")
	}
	if !c.LooksLikeTLS(7443) {
		t.Error("TLS on 7443 not recognised")
	}
	if c.Contains(secret) {
		t.Error("the TLS payload appears in the capture in plaintext")
	}
	if c.Truncated() || c.Frames() == 0 {
		t.Errorf("frames %d, truncated %v", c.Frames(), c.Truncated())
	}

	// After Stop, nothing more is recorded; Reset forgets.
	n := c.Frames()
	after := []byte("capture-after-stop-8c2f17")
	conn, err := Dial(a.NetNS, "tcp4", netip.MustParseAddr("10.213.251.2"), 7100, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Write(after); err != nil {
		t.Fatal(err)
	}
	conn.Close()
	time.Sleep(100 * time.Millisecond)
	if c.Frames() != n || c.Contains(after) {
		t.Errorf("frames recorded after Stop: %d, then %d", n, c.Frames())
	}
	c.Reset()
	if c.Frames() != 0 || c.Contains(payloads[netip.MustParseAddr("10.213.251.2")]) {
		t.Error("Reset kept frames")
	}
}

// selfSigned is a throwaway server certificate.
func selfSigned(t *testing.T) tls.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
}
