package policy

import (
	"strings"
	"testing"

	"github.com/bulkhead-io/bulkhead/policy/api/v1alpha1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func runtimePolicy(sel v1alpha1.Selector, d ...v1alpha1.RuntimeDetection) *v1alpha1.BulkheadRuntimePolicy {
	return &v1alpha1.BulkheadRuntimePolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "rp", Namespace: "shop"},
		Spec:       v1alpha1.BulkheadRuntimePolicySpec{Selector: sel, Detections: d},
	}
}

func TestValidateRuntimePolicy(t *testing.T) {
	app := v1alpha1.Selector{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "cart"}}}
	det := func(rule string, a v1alpha1.RuntimeAction) v1alpha1.RuntimeDetection {
		return v1alpha1.RuntimeDetection{Rule: rule, Action: a}
	}
	cases := []struct {
		name string
		rp   *v1alpha1.BulkheadRuntimePolicy
		err  string // "" for valid; else a substring of the error
	}{
		{"block runtime socket", runtimePolicy(app, det("BH-RT-007", "Block"), det("BH-RT-009", "Block")), ""},
		{"kill and alert", runtimePolicy(v1alpha1.Selector{SPIFFEID: "spiffe://cluster.local/ns/shop/sa/*"},
			det("BH-RT-001", "Kill"), det("BH-RT-010", "Kill"), det("BH-RT-003", "Alert")), ""},
		{"block a tracepoint rule", runtimePolicy(app, det("BH-RT-003", "Block")),
			"spec.detections[0].action: Invalid value: \"Block\": Block is only possible for the rules a cgroup hook can deny"},
		{"kill a cgroup rule", runtimePolicy(app, det("BH-RT-008", "Kill")), "spec.detections[0].action: Invalid value: \"Kill\": Kill is only possible"},
		{"quarantine on any rule", runtimePolicy(app, det("BH-RT-007", "Quarantine"), det("BH-RT-002", "Quarantine"), det("BH-RT-016", "Quarantine")), ""},
		{"block the metadata service", runtimePolicy(app, det("BH-RT-017", "Block")), ""},
		{"kill a metadata connect", runtimePolicy(app, det("BH-RT-017", "Kill")), "BH-RT-017 is seen by a cgroup hook: use Block, Quarantine or Alert"},
		{"kill a scan", runtimePolicy(app, det("BH-RT-016", "Kill")), "BH-RT-016 is seen by the agent in the pod's flows, after the fact: use Quarantine or Alert"},
		{"block a scan", runtimePolicy(app, det("BH-RT-016", "Block")), "Block is only possible for the rules a cgroup hook can deny"},
		{"unknown rule", runtimePolicy(app, det("BH-RT-099", "Alert")), "spec.detections[0].rule: Unsupported value: \"BH-RT-099\""},
		{"unknown action", runtimePolicy(app, det("BH-RT-001", "Pause")), "spec.detections[0].action: Unsupported value: \"Pause\""},
		{"duplicate rule", runtimePolicy(app, det("BH-RT-001", "Alert"), det("BH-RT-001", "Kill")), "spec.detections[1].rule: Duplicate value"},
		{"no detections", runtimePolicy(app), "spec.detections: Required value"},
		{"no selector", runtimePolicy(v1alpha1.Selector{}, det("BH-RT-001", "Alert")), "spec.selector: Required value"},
		{"other namespace", runtimePolicy(v1alpha1.Selector{SPIFFEID: "spiffe://cluster.local/ns/bank/sa/x"}, det("BH-RT-001", "Alert")),
			"selects namespace bank, but the policy is in shop"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := ValidateRuntimePolicy(c.rp)
			switch {
			case c.err == "" && err != nil:
				t.Fatalf("want valid: %v", err)
			case c.err != "" && (err == nil || !strings.Contains(err.Error(), c.err)):
				t.Fatalf("error %v, want one containing %q", err, c.err)
			}
		})
	}
}

func TestRuntimeActions(t *testing.T) {
	mk := func(sel v1alpha1.Selector, d ...v1alpha1.RuntimeDetection) *RuntimePolicy {
		p, err := CompileRuntimePolicy(runtimePolicy(sel, d...))
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	cart := mk(v1alpha1.Selector{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "cart"}}},
		v1alpha1.RuntimeDetection{Rule: "BH-RT-007", Action: "Block"}, v1alpha1.RuntimeDetection{Rule: "BH-RT-005", Action: "Alert"})
	sa := mk(v1alpha1.Selector{SPIFFEID: "spiffe://cluster.local/ns/shop/sa/cart"},
		v1alpha1.RuntimeDetection{Rule: "BH-RT-005", Action: "Kill"})
	pols := []*RuntimePolicy{cart, sa}
	got := RuntimeActions(pols, "shop", map[string]string{"app": "cart"}, "spiffe://cluster.local/ns/shop/sa/cart")
	if len(got) != 2 || got["BH-RT-007"] != "Block" || got["BH-RT-005"] != "Kill" {
		t.Errorf("cart pod: %v", got)
	}
	if got := RuntimeActions(pols, "bank", map[string]string{"app": "cart"}, "spiffe://cluster.local/ns/shop/sa/cart"); len(got) != 0 {
		t.Errorf("a pod of another namespace: %v, want none (Alert everywhere)", got)
	}
	if got := RuntimeActions(pols, "shop", map[string]string{"app": "web"}, "spiffe://cluster.local/ns/shop/sa/web"); len(got) != 0 {
		t.Errorf("an unselected pod: %v", got)
	}
	// Quarantine adds to the kernel's answer; it never replaces it.
	q := mk(v1alpha1.Selector{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "cart"}}},
		v1alpha1.RuntimeDetection{Rule: "BH-RT-007", Action: "Quarantine"}, v1alpha1.RuntimeDetection{Rule: "BH-RT-002", Action: "Quarantine"})
	for _, order := range [][]*RuntimePolicy{{cart, sa, q}, {q, cart, sa}} {
		got := RuntimeActions(order, "shop", map[string]string{"app": "cart"}, "spiffe://cluster.local/ns/shop/sa/cart")
		if got["BH-RT-007"] != "Block" || got["BH-RT-005"] != "Kill" || got["BH-RT-002"] != "Alert" {
			t.Errorf("with a quarantine policy: kernel answers %v", got)
		}
		qs := RuntimeQuarantines(order, "shop", map[string]string{"app": "cart"}, "spiffe://cluster.local/ns/shop/sa/cart")
		if len(qs) != 2 || !qs["BH-RT-007"] || !qs["BH-RT-002"] {
			t.Errorf("quarantining rules %v", qs)
		}
	}
	if qs := RuntimeQuarantines([]*RuntimePolicy{q}, "shop", map[string]string{"app": "web"}, ""); len(qs) != 0 {
		t.Errorf("an unselected pod is quarantined by %v", qs)
	}
}
