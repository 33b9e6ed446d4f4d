package runtime

import (
	"errors"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/bulkhead-io/bulkhead/policy/api/v1alpha1"
	"github.com/bulkhead-io/bulkhead/runtime/detect"
)

// TestRuleCatalog: the API's rule catalog (what BulkheadRuntimePolicy
// accepts) and the monitor agree: the same IDs in the same order (rule i
// is kernel bit 1<<i), Block exactly where a cgroup hook sees the rule, and
// Kill exactly where a tracepoint does.
func TestRuleCatalog(t *testing.T) {
	api, rules := v1alpha1.RuntimeRules(), detect.Rules()
	if len(api) != len(rules) {
		t.Fatalf("API has %d rules, detect %d", len(api), len(rules))
	}
	for i, r := range api {
		if rules[i].ID != r.ID || detect.Bit(r.ID) != 1<<i {
			t.Errorf("rule %d: API %s, detect %s, bit %#x", i, r.ID, rules[i].ID, detect.Bit(r.ID))
		}
		hooked := HookOf(r.ID) != ""
		if r.Agent {
			if r.Block || r.Kill || hooked {
				t.Errorf("%s: seen by the agent, yet Block %v Kill %v, cgroup hook %q", r.ID, r.Block, r.Kill, HookOf(r.ID))
			}
			continue
		}
		if r.Block != hooked || r.Kill == hooked {
			t.Errorf("%s: API Block %v Kill %v, cgroup hook %q", r.ID, r.Block, r.Kill, HookOf(r.ID))
		}
	}
	if detect.Bit("BH-RT-999") != 0 {
		t.Error("an unknown rule has a bit")
	}
}

func TestSockNames(t *testing.T) {
	if _, err := sockNames(DefaultRuntimeSockets); err != nil {
		t.Fatal(err)
	}
	for _, bad := range [][]string{
		{""}, {"run/docker.sock"}, {strings.Repeat("a", 33)}, {"a\x00b"},
		{"1", "2", "3", "4", "5", "6", "7", "8", "9"},
	} {
		if _, err := sockNames(bad); err == nil {
			t.Errorf("runtime sockets %q accepted", bad)
		}
	}
	n, err := sockNames([]string{strings.Repeat("b", 32)})
	if err != nil || n[0].Name[31] != 'b' {
		t.Errorf("a 32-byte name: %v %v", n, err)
	}
}

// A kernel without an optional tracepoint: the monitor attaches the rest
// and says which is missing and why, instead of failing.
func TestAttachOptionalMissing(t *testing.T) {
	tracefs := t.TempDir()
	// One listed but unusable (no program here): reported as an attach error.
	if err := os.MkdirAll(filepath.Join(tracefs, "events", "syscalls", "sys_enter_chroot"), 0o755); err != nil {
		t.Fatal(err)
	}
	m := &Monitor{optional: map[string]error{}, log: slog.New(slog.DiscardHandler)}
	m.attachOptional(tracefs)
	hooks := m.OptionalHooks()
	if len(hooks) != len(optionalTracepoints) || len(m.links) != 0 {
		t.Fatalf("hooks %v, links %d", hooks, len(m.links))
	}
	for _, name := range optionalTracepoints {
		err := hooks["syscalls/"+name]
		switch {
		case err == nil:
			t.Errorf("%s: attached in an empty tracefs", name)
		case name == "sys_enter_chroot" && errors.Is(err, ErrNotSupported):
			t.Errorf("%s: %v, want an attach error", name, err)
		case name != "sys_enter_chroot" && !errors.Is(err, ErrNotSupported):
			t.Errorf("%s: %v, want ErrNotSupported", name, err)
		}
	}
}

// TestModulePathChoice: the module tracepoints when the kernel has them;
// without them, raw_tp sys_enter on a kernel that can load modules, and
// nothing on one that cannot (no /proc/modules).
func TestModulePathChoice(t *testing.T) {
	with, without := t.TempDir(), t.TempDir()
	for _, n := range []string{"sys_enter_init_module", "sys_enter_finit_module"} {
		if err := os.MkdirAll(filepath.Join(with, "events", "syscalls", n), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	modules := filepath.Join(t.TempDir(), "modules")
	if err := os.WriteFile(modules, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	gone := filepath.Join(t.TempDir(), "modules")
	for _, c := range []struct {
		tracefs, modules string
		want             ModulePath
	}{
		{with, modules, ModuleTracepoints},
		{without, modules, ModuleRawSysEnter},
		{without, gone, ModuleNone},
	} {
		if got := modulePathIn(c.tracefs, c.modules); got != c.want {
			t.Errorf("tracefs %s, modules %s: %q, want %q", c.tracefs, c.modules, got, c.want)
		}
	}
}
