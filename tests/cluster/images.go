package cluster

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/bulkhead-io/bulkhead/tests/cnichain"
)

// The images the tests import (docker.io/ is what a short name means to the
// kubelet and containerd). Pods use imagePullPolicy: Never.
const (
	PauseRef    = "docker.io/bulkhead-test/pause:1"
	EchoRef     = "docker.io/bulkhead-test/echoserver:1"
	BulkheadRef = "docker.io/bulkhead/bulkhead:cluster-test"
)

// EchoHTTPPort and EchoTCPPort are the test server's ports.
const (
	EchoHTTPPort = 8080
	EchoTCPPort  = 7070
)

// goBuild builds a static binary of a package of this repository.
func goBuild(t testing.TB, pkg, out string) {
	t.Helper()
	cmd := exec.Command("go", "build", "-trimpath", "-o", out, pkg)
	cmd.Dir = cnichain.RepoRoot(t)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build %s: %v\n%s", pkg, err, b)
	}
}

// PauseImage builds the sandbox image (tests/cluster/cmd/pause) into dir and
// returns its archive.
func PauseImage(t testing.TB, dir string) string {
	t.Helper()
	bin := filepath.Join(dir, "pause")
	goBuild(t, "./tests/cluster/cmd/pause", bin)
	out := filepath.Join(dir, "pause.tar")
	WriteArchive(t, Image{Ref: PauseRef, Files: map[string]string{"/pause": bin}, Entrypoint: []string{"/pause"}}, out)
	return out
}

// EchoImage builds the test server's image (tests/cluster/cmd/echoserver).
func EchoImage(t testing.TB, dir string) string {
	t.Helper()
	bin := filepath.Join(dir, "echoserver")
	goBuild(t, "./tests/cluster/cmd/echoserver", bin)
	out := filepath.Join(dir, "echoserver.tar")
	WriteArchive(t, Image{Ref: EchoRef, Files: map[string]string{"/echoserver": bin}, Entrypoint: []string{"/echoserver"}}, out)
	return out
}

// BulkheadImage is Bulkhead's image: bulkhead-agent, bulkhead-cni and
// bulkhead in binDir (the chart's image.binDir), built static from this
// checkout (bin/'s bulkhead-agent links libc, which an image from scratch
// does not have). It writes one archive per ref, all of the same image.
func BulkheadImage(t testing.TB, dir, binDir string, refs ...string) []string {
	t.Helper()
	files := map[string]string{}
	for _, b := range []string{"bulkhead-agent", "bulkhead-cni", "bulkhead"} {
		p := filepath.Join(dir, b)
		goBuild(t, "./cmd/"+b, p)
		files[filepath.Join(binDir, b)] = p
	}
	var out []string
	for i, ref := range refs {
		a := filepath.Join(dir, fmt.Sprintf("bulkhead-%d.tar", i))
		WriteArchive(t, Image{Ref: ref, Files: files, Entrypoint: []string{filepath.Join(binDir, "bulkhead-agent")}}, a)
		out = append(out, a)
	}
	return out
}
