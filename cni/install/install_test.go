package install

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

const ptpList = `{
  "cniVersion": "1.0.0",
  "name": "podnet",
  "disableCheck": false,
  "plugins": [
    {"type": "ptp", "ipMasq": true, "mtu": 1500.0,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.88.0.0/16"}]], "note": "a<b&c"}},
    {"type": "portmap", "capabilities": {"portMappings": true}}
  ],
  "x-extra": [1, 2e3, "\u00e9"]
}
`

const ptpConf = `{"cniVersion":"0.4.0","name":"podnet","type":"bridge","bridge":"cni0","isGateway":true,
 "ipam":{"type":"host-local","subnet":"10.22.0.0/16"}}`

type env struct {
	t    *testing.T
	opts Options
}

func newEnv(t *testing.T) *env {
	t.Helper()
	root := t.TempDir()
	o := Options{BinDir: filepath.Join(root, "bin"), ConfDir: filepath.Join(root, "net.d"),
		PluginBinary: filepath.Join(root, "src", PluginType), Debounce: 10 * time.Millisecond}
	for _, d := range []string{o.BinDir, o.ConfDir, filepath.Dir(o.PluginBinary)} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(o.PluginBinary, []byte("#!/bin/true\nplugin\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	return &env{t: t, opts: o}
}

func (e *env) path(name string) string { return filepath.Join(e.opts.ConfDir, name) }

func (e *env) write(name, content string, perm fs.FileMode) {
	e.t.Helper()
	if err := os.WriteFile(e.path(name), []byte(content), perm); err != nil {
		e.t.Fatal(err)
	}
	if err := os.Chmod(e.path(name), perm); err != nil {
		e.t.Fatal(err)
	}
}

func (e *env) read(name string) []byte {
	e.t.Helper()
	b, err := os.ReadFile(e.path(name))
	if err != nil {
		e.t.Fatal(err)
	}
	return b
}

// files lists the visible files of the config folder.
func (e *env) files() []string {
	e.t.Helper()
	ents, err := os.ReadDir(e.opts.ConfDir)
	if err != nil {
		e.t.Fatal(err)
	}
	var out []string
	for _, en := range ents {
		if !strings.HasPrefix(en.Name(), ".") {
			out = append(out, en.Name())
		}
	}
	return out
}

// snapshot is every file under the config folder (hidden ones too) with its
// content, for "nothing changed" checks.
func (e *env) snapshot() map[string]string {
	e.t.Helper()
	m := map[string]string{}
	err := filepath.WalkDir(e.opts.ConfDir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		if p == filepath.Join(e.opts.StateDir, lockName) || p == filepath.Join(e.opts.ConfDir, DefaultStateDirName, lockName) {
			// The installers' lock: its content is empty and means nothing.
			return nil
		}
		b, err := os.ReadFile(p)
		m[p] = string(b)
		return err
	})
	if err != nil {
		e.t.Fatal(err)
	}
	return m
}

func compact(t *testing.T, raw []byte) string {
	t.Helper()
	var b bytes.Buffer
	if err := json.Compact(&b, raw); err != nil {
		t.Fatalf("compact %s: %v", raw, err)
	}
	return b.String()
}

// checkChained checks that file is a conflist holding exactly one entry of
// ours, last or where it was, and that its other plugins are want's, in
// order, as written.
func checkChained(t *testing.T, got []byte, wantOthers []json.RawMessage, socket string) {
	t.Helper()
	l, err := parseList(got)
	if err != nil {
		t.Fatalf("result does not parse: %v\n%s", err, got)
	}
	if n := len(l.ours()); n != 1 {
		t.Fatalf("%d bulkhead-cni entries, want 1:\n%s", n, got)
	}
	if !entryMatches(l.plugins[l.ours()[0]], socket) {
		t.Errorf("entry %s, want socket %q", l.plugins[l.ours()[0]], socket)
	}
	var others []string
	for i, p := range l.plugins {
		if l.types[i] != PluginType {
			others = append(others, compact(t, p))
		}
	}
	var want []string
	for _, p := range wantOthers {
		want = append(want, compact(t, p))
	}
	if !slices.Equal(others, want) {
		t.Errorf("other plugins changed:\n got %v\nwant %v", others, want)
	}
}

func pluginsOf(t *testing.T, data string) []json.RawMessage {
	t.Helper()
	l, err := parseList([]byte(data))
	if err != nil {
		t.Fatal(err)
	}
	return l.plugins
}

func TestInstallConflistIdempotentAndUninstallRestores(t *testing.T) {
	e := newEnv(t)
	e.write("10-ptp.conflist", ptpList, 0o640)
	e.write("20-other.conflist", `{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"bridge"}]}`, 0o644)
	if ok, err := Installed(e.opts); ok || err != nil {
		t.Fatalf("Installed before install: %v, %v", ok, err)
	}
	if err := Install(e.opts); err != nil {
		t.Fatal(err)
	}
	got := e.read("10-ptp.conflist")
	checkChained(t, got, pluginsOf(t, ptpList), "")
	top, err := parseObject(got)
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, f := range top {
		keys = append(keys, f.key)
	}
	if want := []string{"cniVersion", "name", "disableCheck", "plugins", "x-extra"}; !slices.Equal(keys, want) {
		t.Errorf("top-level keys %v, want %v in the original order", keys, want)
	}
	if x, _ := top.get("x-extra"); compact(t, x) != `[1,2e3,"\u00e9"]` {
		t.Errorf("x-extra rewritten: %s", x)
	}
	if st, _ := os.Stat(e.path("10-ptp.conflist")); st.Mode().Perm() != 0o640 {
		t.Errorf("mode %v, want the original 0640", st.Mode().Perm())
	}
	if b := e.read("20-other.conflist"); bytes.Contains(b, []byte(PluginType)) {
		t.Errorf("a config that is not the primary was changed: %s", b)
	}
	bin := filepath.Join(e.opts.BinDir, PluginType)
	if st, err := os.Stat(bin); err != nil || st.Mode().Perm() != 0o755 {
		t.Fatalf("binary: %v, %v; want mode 0755", st, err)
	}
	if ok, err := Installed(e.opts); !ok || err != nil {
		t.Fatalf("Installed after install: %v, %v", ok, err)
	}

	// A second run changes nothing: not the bytes, not even the inode.
	before := e.snapshot()
	ino := inode(t, e.path("10-ptp.conflist"))
	binIno := inode(t, bin)
	if err := Install(e.opts); err != nil {
		t.Fatal(err)
	}
	if after := e.snapshot(); !equalMaps(before, after) {
		t.Errorf("second install changed files:\nbefore %v\nafter  %v", before, after)
	}
	if inode(t, e.path("10-ptp.conflist")) != ino || inode(t, bin) != binIno {
		t.Error("second install rewrote a file with the same content")
	}

	if err := Uninstall(e.opts); err != nil {
		t.Fatal(err)
	}
	if got := e.read("10-ptp.conflist"); string(got) != ptpList {
		t.Errorf("uninstall did not restore the original byte for byte:\n%s", got)
	}
	if st, _ := os.Stat(e.path("10-ptp.conflist")); st.Mode().Perm() != 0o640 {
		t.Errorf("restored mode %v, want 0640", st.Mode().Perm())
	}
	if _, err := os.Stat(bin); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("binary left behind: %v", err)
	}
	if _, err := os.Stat(filepath.Join(e.opts.ConfDir, DefaultStateDirName)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("state folder left behind: %v", err)
	}
	if ok, _ := Installed(e.opts); ok {
		t.Error("Installed after uninstall")
	}
}

func inode(t *testing.T, p string) uint64 {
	t.Helper()
	st, err := os.Stat(p)
	if err != nil {
		t.Fatal(err)
	}
	return st.Sys().(*syscall.Stat_t).Ino
}

func equalMaps(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if w, ok := b[k]; !ok || w != v {
			return false
		}
	}
	return true
}

func TestInstallConvertsSingleConfig(t *testing.T) {
	for _, ext := range []string{".conf", ".json"} {
		t.Run(ext, func(t *testing.T) {
			e := newEnv(t)
			e.opts.Socket = "/run/bulkhead/agent.sock"
			e.write("10-bridge"+ext, ptpConf, 0o600)
			e.write("99-later.conflist", `{"cniVersion":"1.0.0","name":"later","plugins":[{"type":"ptp"}]}`, 0o644)
			if ok, _ := Installed(e.opts); ok {
				t.Fatal("Installed before install")
			}
			if err := Install(e.opts); err != nil {
				t.Fatal(err)
			}
			if got, want := e.files(), []string{"10-bridge.conflist", "99-later.conflist"}; !slices.Equal(got, want) {
				t.Fatalf("files %v, want %v (the single config replaced by its list)", got, want)
			}
			got := e.read("10-bridge.conflist")
			checkChained(t, got, []json.RawMessage{json.RawMessage(ptpConf)}, e.opts.Socket)
			var head struct{ CNIVersion, Name string }
			if err := json.Unmarshal(got, &head); err != nil || head.CNIVersion != "0.4.0" || head.Name != "podnet" {
				t.Errorf("list head %+v, %v; want the conf's cniVersion and name", head, err)
			}
			if ok, err := Installed(e.opts); !ok || err != nil {
				t.Fatalf("Installed: %v, %v", ok, err)
			}
			before := e.snapshot()
			if err := Install(e.opts); err != nil {
				t.Fatal(err)
			}
			if !equalMaps(before, e.snapshot()) {
				t.Error("second install changed files")
			}
			if err := Uninstall(e.opts); err != nil {
				t.Fatal(err)
			}
			if got, want := e.files(), []string{"10-bridge" + ext, "99-later.conflist"}; !slices.Equal(got, want) {
				t.Fatalf("after uninstall files %v, want %v", got, want)
			}
			if got := e.read("10-bridge" + ext); string(got) != ptpConf {
				t.Errorf("not restored byte for byte:\n%s", got)
			}
			if st, _ := os.Stat(e.path("10-bridge" + ext)); st.Mode().Perm() != 0o600 {
				t.Errorf("restored mode %v, want 0600", st.Mode().Perm())
			}
		})
	}
}

func TestSocketChangeKeepsOriginal(t *testing.T) {
	e := newEnv(t)
	e.write("10-ptp.conflist", ptpList, 0o644)
	e.opts.Socket = "/run/a.sock"
	if err := Install(e.opts); err != nil {
		t.Fatal(err)
	}
	e.opts.Socket = "/run/b.sock"
	if err := Install(e.opts); err != nil {
		t.Fatal(err)
	}
	checkChained(t, e.read("10-ptp.conflist"), pluginsOf(t, ptpList), "/run/b.sock")
	e.opts.Socket = ""
	if err := Install(e.opts); err != nil {
		t.Fatal(err)
	}
	checkChained(t, e.read("10-ptp.conflist"), pluginsOf(t, ptpList), "")
	if err := Uninstall(e.opts); err != nil {
		t.Fatal(err)
	}
	if got := e.read("10-ptp.conflist"); string(got) != ptpList {
		t.Errorf("not restored byte for byte:\n%s", got)
	}
}

// The primary CNI rewrites its file (flannel and Calico do on start).
func TestPrimaryRewrites(t *testing.T) {
	rewritten := strings.Replace(ptpList, `"mtu": 1500.0`, `"mtu": 1450`, 1)

	t.Run("uninstall keeps the rewrite", func(t *testing.T) {
		e := newEnv(t)
		e.write("10-ptp.conflist", ptpList, 0o644)
		if err := Install(e.opts); err != nil {
			t.Fatal(err)
		}
		e.write("10-ptp.conflist", rewritten, 0o644)
		if ok, _ := Installed(e.opts); ok {
			t.Fatal("Installed after the primary dropped the entry")
		}
		if err := Uninstall(e.opts); err != nil {
			t.Fatal(err)
		}
		if got := e.read("10-ptp.conflist"); string(got) != rewritten {
			t.Errorf("uninstall replaced the primary's newer file:\n%s", got)
		}
	})
	t.Run("reinserted, then the rewrite restored", func(t *testing.T) {
		e := newEnv(t)
		e.write("10-ptp.conflist", ptpList, 0o644)
		if err := Install(e.opts); err != nil {
			t.Fatal(err)
		}
		e.write("10-ptp.conflist", rewritten, 0o644)
		if err := Install(e.opts); err != nil {
			t.Fatal(err)
		}
		checkChained(t, e.read("10-ptp.conflist"), pluginsOf(t, rewritten), "")
		if err := Uninstall(e.opts); err != nil {
			t.Fatal(err)
		}
		if got := e.read("10-ptp.conflist"); string(got) != rewritten {
			t.Errorf("uninstall did not restore the primary's latest file byte for byte:\n%s", got)
		}
	})
	t.Run("edited with our entry kept: only the entry goes", func(t *testing.T) {
		e := newEnv(t)
		e.write("10-ptp.conflist", ptpList, 0o644)
		if err := Install(e.opts); err != nil {
			t.Fatal(err)
		}
		edited := strings.Replace(string(e.read("10-ptp.conflist")), `"podnet"`, `"podnet2"`, 1)
		e.write("10-ptp.conflist", edited, 0o644)
		e.opts.Socket = "/run/x.sock" // makes Install write again
		if err := Install(e.opts); err != nil {
			t.Fatal(err)
		}
		if err := Uninstall(e.opts); err != nil {
			t.Fatal(err)
		}
		got := e.read("10-ptp.conflist")
		if hasEntry(got) || !bytes.Contains(got, []byte(`"podnet2"`)) {
			t.Errorf("want the edit kept and our entry gone:\n%s", got)
		}
		if l, err := parseList(got); err != nil || len(l.plugins) != 2 {
			t.Errorf("plugins after uninstall: %v, %v", l, err)
		}
	})
	t.Run("the .conf written again after conversion", func(t *testing.T) {
		e := newEnv(t)
		e.write("10-bridge.conf", ptpConf, 0o644)
		if err := Install(e.opts); err != nil {
			t.Fatal(err)
		}
		newer := strings.Replace(ptpConf, "cni0", "cni1", 1)
		e.write("10-bridge.conf", newer, 0o644)
		if ok, _ := Installed(e.opts); ok {
			t.Fatal("Installed while the runtime reads the new .conf")
		}
		if err := Install(e.opts); err != nil {
			t.Fatal(err)
		}
		if got := e.files(); !slices.Equal(got, []string{"10-bridge.conflist"}) {
			t.Fatalf("files %v", got)
		}
		checkChained(t, e.read("10-bridge.conflist"), []json.RawMessage{json.RawMessage(newer)}, "")
		if err := Uninstall(e.opts); err != nil {
			t.Fatal(err)
		}
		if got := e.read("10-bridge.conf"); string(got) != newer {
			t.Errorf("not the newer .conf byte for byte:\n%s", got)
		}
		if got := e.files(); !slices.Equal(got, []string{"10-bridge.conf"}) {
			t.Fatalf("files after uninstall %v", got)
		}
	})
}

func TestNewPrimaryAppears(t *testing.T) {
	e := newEnv(t)
	e.write("10-bridge.conf", ptpConf, 0o644)
	if err := Install(e.opts); err != nil {
		t.Fatal(err)
	}
	e.write("05-calico.conflist", ptpList, 0o644)
	if err := Install(e.opts); err != nil {
		t.Fatal(err)
	}
	if got := e.read("10-bridge.conf"); string(got) != ptpConf {
		t.Errorf("the old primary was not given back:\n%s", got)
	}
	if got := e.files(); !slices.Equal(got, []string{"05-calico.conflist", "10-bridge.conf"}) {
		t.Fatalf("files %v", got)
	}
	checkChained(t, e.read("05-calico.conflist"), pluginsOf(t, ptpList), "")
	if err := Uninstall(e.opts); err != nil {
		t.Fatal(err)
	}
	if got := e.read("05-calico.conflist"); string(got) != ptpList {
		t.Errorf("not restored:\n%s", got)
	}
}

func TestStateLost(t *testing.T) {
	e := newEnv(t)
	e.write("10-ptp.conflist", ptpList, 0o644)
	if err := Install(e.opts); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(filepath.Join(e.opts.ConfDir, DefaultStateDirName)); err != nil {
		t.Fatal(err)
	}
	chained := e.read("10-ptp.conflist")
	if err := Install(e.opts); err != nil {
		t.Fatal(err)
	}
	if got := e.read("10-ptp.conflist"); !bytes.Equal(got, chained) {
		t.Error("install without a record rewrote a chained file")
	}
	if err := Uninstall(e.opts); err != nil {
		t.Fatal(err)
	}
	got := e.read("10-ptp.conflist")
	if hasEntry(got) {
		t.Errorf("entry left:\n%s", got)
	}
	if l, err := parseList(got); err != nil || !slices.Equal(l.types, []string{"ptp", "portmap"}) {
		t.Errorf("after uninstall: %v, %v", l, err)
	}
}

func TestBadInputLeftUntouched(t *testing.T) {
	for _, tt := range []struct {
		name, file, content string
		want                error
		msg                 string
	}{
		{"syntax", "10-a.conflist", `{"cniVersion":"1.0.0","plugins":[{"type":"ptp"}`, ErrMalformed, "unexpected end"},
		{"plugins not a list", "10-a.conflist", `{"cniVersion":"1.0.0","plugins":{"type":"ptp"}}`, ErrMalformed, `"plugins" is not a list`},
		{"no plugins", "10-a.conflist", `{"cniVersion":"1.0.0","name":"n"}`, ErrMalformed, `no "plugins"`},
		{"empty plugins", "10-a.conflist", `{"cniVersion":"1.0.0","plugins":[]}`, ErrMalformed, "empty"},
		{"plugin without type", "10-a.conflist", `{"cniVersion":"1.0.0","plugins":[{"ipam":{}}]}`, ErrMalformed, `plugins[0]: plugin without "type"`},
		{"duplicate key", "10-a.conflist", `{"cniVersion":"1.0.0","plugins":[{"type":"a"}],"plugins":[]}`, ErrMalformed, "duplicate key"},
		{"not an object", "10-a.conflist", `[1]`, ErrMalformed, "not a JSON object"},
		{"trailing", "10-a.conf", `{"cniVersion":"1.0.0","type":"ptp"} {}`, ErrMalformed, "invalid"},
		{"list in a conf", "10-a.conf", `{"cniVersion":"1.0.0","plugins":[{"type":"ptp"}]}`, ErrMalformed, "*.conflist"},
		{"old version", "10-a.conflist", `{"cniVersion":"0.2.0","plugins":[{"type":"ptp"}]}`, ErrUnsupportedVersion, `"0.2.0"`},
		{"no version", "10-a.conf", `{"name":"n","type":"ptp"}`, ErrUnsupportedVersion, "no \"cniVersion\""},
		{"version not a string", "10-a.conflist", `{"cniVersion":1,"plugins":[{"type":"ptp"}]}`, ErrMalformed, "not a string"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t)
			e.write(tt.file, tt.content, 0o644)
			before := e.snapshot()
			err := Install(e.opts)
			if !errors.Is(err, tt.want) || !strings.Contains(err.Error(), e.path(tt.file)) || !strings.Contains(err.Error(), tt.msg) {
				t.Fatalf("error %v; want %v naming %s and saying %q", err, tt.want, e.path(tt.file), tt.msg)
			}
			if _, err := os.Stat(filepath.Join(e.opts.BinDir, PluginType)); !errors.Is(err, fs.ErrNotExist) {
				t.Errorf("binary installed for a config that cannot take the entry: %v", err)
			}
			if after := e.snapshot(); !equalMaps(before, after) {
				t.Errorf("files changed:\nbefore %v\nafter  %v", before, after)
			}
		})
	}
}

func TestConvertWouldOverwrite(t *testing.T) {
	e := newEnv(t)
	e.write("10-a.conf", ptpConf, 0o644)
	e.write("10-a.conflist", ptpList, 0o644)
	before := e.snapshot()
	if err := Install(e.opts); err == nil || !strings.Contains(err.Error(), "10-a.conflist exists") {
		t.Fatalf("error %v, want a refusal to overwrite 10-a.conflist", err)
	}
	if !equalMaps(before, e.snapshot()) {
		t.Error("files changed")
	}
}

func TestNoConfig(t *testing.T) {
	e := newEnv(t)
	e.write("README", "not a config", 0o644)
	err := Install(e.opts)
	if !errors.Is(err, ErrNoConfig) || !strings.Contains(err.Error(), e.opts.ConfDir) {
		t.Fatalf("Install: %v; want ErrNoConfig naming the folder", err)
	}
	if ok, err := Installed(e.opts); ok || !errors.Is(err, ErrNoConfig) {
		t.Fatalf("Installed: %v, %v", ok, err)
	}
	if err := Uninstall(e.opts); err != nil {
		t.Fatalf("Uninstall with nothing installed: %v", err)
	}
}

// concurrencyCheck checks the folder after several installers ran at once:
// one chained list, one entry, and an uninstall that restores the original.
func concurrencyCheck(t *testing.T, e *env, socket string) {
	t.Helper()
	if got := e.files(); !slices.Equal(got, []string{"10-bridge.conflist"}) {
		t.Fatalf("files %v", got)
	}
	checkChained(t, e.read("10-bridge.conflist"), []json.RawMessage{json.RawMessage(ptpConf)}, socket)
	if err := Uninstall(e.opts); err != nil {
		t.Fatal(err)
	}
	if got := e.read("10-bridge.conf"); string(got) != ptpConf {
		t.Errorf("not restored byte for byte after concurrent installs:\n%s", got)
	}
}

// Installers with different sockets race; each one that writes pauses
// between its record and its file, the earlier ones longer, so that without
// the lock the record left last would not describe the file left last, and
// the uninstall could not restore the original.
func TestConcurrentInstallGoroutines(t *testing.T) {
	e := newEnv(t)
	e.write("10-bridge.conf", ptpConf, 0o644)
	const n = 6
	var wg sync.WaitGroup
	errs := make(chan error, n)
	var sockets []string
	for i := range n {
		o := e.opts
		o.Socket = fmt.Sprintf("/run/bulkhead/%d.sock", i)
		sockets = append(sockets, o.Socket)
		o.beforeWrite = func() { time.Sleep(time.Duration(n-i) * 10 * time.Millisecond) }
		wg.Go(func() { errs <- Install(o) })
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	l, err := parseList(e.read("10-bridge.conflist"))
	if err != nil || len(l.ours()) != 1 {
		t.Fatalf("after the race: %v, %v", l, err)
	}
	var entry struct{ Socket string }
	_ = json.Unmarshal(l.plugins[l.ours()[0]], &entry)
	if !slices.Contains(sockets, entry.Socket) {
		t.Errorf("entry socket %q is none of the installers'", entry.Socket)
	}
	concurrencyCheck(t, e, entry.Socket)
}

// installerEnv makes the test binary an installer process (see
// TestConcurrentInstallProcesses).
const installerEnv = "BULKHEAD_INSTALL_TEST_OPTS"

func TestConcurrentInstallProcesses(t *testing.T) {
	if js := os.Getenv(installerEnv); js != "" {
		var o Options
		if err := json.Unmarshal([]byte(js), &o); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(3)
		}
		delay, _ := time.ParseDuration(os.Getenv(installerEnv + "_DELAY"))
		o.beforeWrite = func() { time.Sleep(delay) }
		if err := Install(o); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	// As with goroutines: different sockets, and the earlier installers
	// pause longer between record and file, so only the lock keeps the
	// record true to the file.
	e := newEnv(t)
	e.write("10-bridge.conf", ptpConf, 0o644)
	const n = 4
	var cmds []*exec.Cmd
	var outs []*bytes.Buffer
	var sockets []string
	for i := range n {
		o := e.opts
		o.Socket = fmt.Sprintf("/run/bulkhead/%d.sock", i)
		sockets = append(sockets, o.Socket)
		js, err := json.Marshal(o)
		if err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(os.Args[0], "-test.run=^TestConcurrentInstallProcesses$")
		cmd.Env = append(os.Environ(), installerEnv+"="+string(js),
			fmt.Sprintf("%s_DELAY=%dms", installerEnv, (n-i)*20))
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		cmds, outs = append(cmds, cmd), append(outs, &out)
	}
	for i, cmd := range cmds {
		if err := cmd.Wait(); err != nil {
			t.Errorf("installer %d: %v\n%s", i, err, outs[i])
		}
	}
	if t.Failed() {
		return
	}
	l, err := parseList(e.read("10-bridge.conflist"))
	if err != nil || len(l.ours()) != 1 {
		t.Fatalf("after the race: %v, %v", l, err)
	}
	var entry struct{ Socket string }
	_ = json.Unmarshal(l.plugins[l.ours()[0]], &entry)
	if !slices.Contains(sockets, entry.Socket) {
		t.Errorf("entry socket %q is none of the installers'", entry.Socket)
	}
	concurrencyCheck(t, e, entry.Socket)
}

// waitFor polls cond; the deadline only bounds a broken test, it asserts no
// timing.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func startWatch(t *testing.T, o Options) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Watch(ctx, o) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Watch: %v", err)
		}
	})
}

func TestWatchReinserts(t *testing.T) {
	e := newEnv(t)
	e.write("10-ptp.conflist", ptpList, 0o644)
	startWatch(t, e.opts)
	installed := func() bool { ok, _ := Installed(e.opts); return ok }
	waitFor(t, "the first install", installed)

	// The primary rewrites its file in place, in two writes, as flannel
	// does: the watch must wait for the whole file, and chain it again.
	rewritten := strings.Replace(ptpList, `"mtu": 1500.0`, `"mtu": 1450`, 1)
	f, err := os.OpenFile(e.path("10-ptp.conflist"), os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = f.WriteString(rewritten[:20])
	_, _ = f.WriteString(rewritten[20:])
	f.Close()
	waitFor(t, "the entry re-inserted", installed)
	checkChained(t, e.read("10-ptp.conflist"), pluginsOf(t, rewritten), "")

	// A new primary appears: it is chained, and the old one given back.
	e.write("05-calico.conflist", ptpList, 0o644)
	waitFor(t, "the new primary chained", installed)
	waitFor(t, "the old primary restored", func() bool {
		b, err := os.ReadFile(e.path("10-ptp.conflist"))
		return err == nil && string(b) == rewritten
	})
	checkChained(t, e.read("05-calico.conflist"), pluginsOf(t, ptpList), "")

	// Our entry removed by hand comes back too.
	e.write("05-calico.conflist", ptpList, 0o644)
	waitFor(t, "the entry back after a hand edit", installed)
}

func TestWatchWaitsForConfig(t *testing.T) {
	e := newEnv(t)
	e.opts.ConfDir = filepath.Join(e.opts.ConfDir, "not-yet")
	startWatch(t, e.opts)
	// Watch creates the folder; the config arrives later.
	waitFor(t, "the folder", func() bool { _, err := os.Stat(e.opts.ConfDir); return err == nil })
	if ok, _ := Installed(e.opts); ok {
		t.Fatal("installed without a config")
	}
	e.write("10-bridge.conf", ptpConf, 0o644)
	waitFor(t, "the install", func() bool { ok, _ := Installed(e.opts); return ok })
	checkChained(t, e.read("10-bridge.conflist"), []json.RawMessage{json.RawMessage(ptpConf)}, "")
}

// The folder removed and made again while Watch runs (a node's
// provisioning wiping it): the watch follows the new folder.
func TestWatchFolderReplaced(t *testing.T) {
	e := newEnv(t)
	e.write("10-ptp.conflist", ptpList, 0o644)
	startWatch(t, e.opts)
	installed := func() bool { ok, _ := Installed(e.opts); return ok }
	waitFor(t, "the first install", installed)
	// The watch may be writing in it (a reconcile after its own write), so
	// the removal may need another try.
	waitFor(t, "the folder removed", func() bool { return os.RemoveAll(e.opts.ConfDir) == nil })
	waitFor(t, "the folder made again", func() bool { _, err := os.Stat(e.opts.ConfDir); return err == nil })
	e.write("10-bridge.conf", ptpConf, 0o644)
	waitFor(t, "the install into the new folder", installed)
	checkChained(t, e.read("10-bridge.conflist"), []json.RawMessage{json.RawMessage(ptpConf)}, "")
}

// A converted config whose entry changes (a new socket) still gives the
// original .conf back.
func TestConvertedSocketChange(t *testing.T) {
	e := newEnv(t)
	e.write("10-bridge.conf", ptpConf, 0o644)
	e.opts.Socket = "/run/a.sock"
	if err := Install(e.opts); err != nil {
		t.Fatal(err)
	}
	e.opts.Socket = "/run/b.sock"
	if err := Install(e.opts); err != nil {
		t.Fatal(err)
	}
	checkChained(t, e.read("10-bridge.conflist"), []json.RawMessage{json.RawMessage(ptpConf)}, "/run/b.sock")
	if err := Uninstall(e.opts); err != nil {
		t.Fatal(err)
	}
	if got := e.files(); !slices.Equal(got, []string{"10-bridge.conf"}) {
		t.Fatalf("files %v", got)
	}
	if got := e.read("10-bridge.conf"); string(got) != ptpConf {
		t.Errorf("not restored byte for byte:\n%s", got)
	}
}
