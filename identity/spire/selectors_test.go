package spire

import (
	"errors"
	"strings"
	"testing"

	"github.com/bulkhead-io/bulkhead/identity"
)

func TestSelectors(t *testing.T) {
	for _, tc := range []struct {
		name string
		w    identity.Workload
		want []string
		err  error
	}{
		{
			name: "all fields",
			w:    identity.Workload{Namespace: "team-a", Name: "web-0", UID: "0b6e6f2c-1", ServiceAccount: "web"},
			want: []string{"k8s:ns:team-a", "k8s:sa:web", "k8s:pod-uid:0b6e6f2c-1", "k8s:pod-name:web-0"},
		},
		{
			name: "service account defaults to default",
			w:    identity.Workload{Namespace: "team-a", Name: "web-0", UID: "u"},
			want: []string{"k8s:ns:team-a", "k8s:sa:default", "k8s:pod-uid:u", "k8s:pod-name:web-0"},
		},
		{
			name: "no uid: no pod-uid selector",
			w:    identity.Workload{Namespace: "team-a", Name: "web-0", ServiceAccount: "web"},
			want: []string{"k8s:ns:team-a", "k8s:sa:web", "k8s:pod-name:web-0"},
		},
		{
			name: "no name: no pod-name selector",
			w:    identity.Workload{Namespace: "team-a", ServiceAccount: "web"},
			want: []string{"k8s:ns:team-a", "k8s:sa:web"},
		},
		{
			name: "values with colons stay whole",
			w:    identity.Workload{Namespace: "a:b", Name: "c:d", ServiceAccount: "e:f"},
			want: []string{"k8s:ns:a:b", "k8s:sa:e:f", "k8s:pod-name:c:d"},
		},
		{
			name: "pid is not a selector",
			w:    identity.Workload{Namespace: "n", PID: 42},
			want: []string{"k8s:ns:n", "k8s:sa:default"},
		},
		{
			name: "no namespace is refused",
			w:    identity.Workload{Name: "web-0", ServiceAccount: "web"},
			err:  ErrNoNamespace,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sels, err := Selectors(tc.w)
			if !errors.Is(err, tc.err) {
				t.Fatalf("err = %v, want %v", err, tc.err)
			}
			if tc.err != nil {
				if sels != nil {
					t.Fatalf("selectors %v with error", sels)
				}
				return
			}
			got := strings.Split(selectorsString(sels), ", ")
			if strings.Join(got, "|") != strings.Join(tc.want, "|") {
				t.Fatalf("selectors = %q, want %q", got, tc.want)
			}
		})
	}
}

// validSelector is what SPIRE's API accepts (api.SelectorsFromProto): a
// type without ':' and a non-empty value. Ours are always k8s selectors of
// a known key with a non-empty value.
func validSelector(typ, value string) bool {
	if typ != "k8s" || value == "" {
		return false
	}
	key, v, ok := strings.Cut(value, ":")
	if !ok || v == "" {
		return false
	}
	switch key {
	case "ns", "sa", "pod-uid", "pod-name":
		return true
	}
	return false
}

func FuzzSelectors(f *testing.F) {
	f.Add("ns", "name", "uid", "sa")
	f.Add("", "name", "uid", "sa")
	f.Add("a:b", "", "", "")
	f.Add(":", ":", ":", ":")
	f.Fuzz(func(t *testing.T, ns, name, uid, sa string) {
		w := identity.Workload{Namespace: ns, Name: name, UID: uid, ServiceAccount: sa}
		sels, err := Selectors(w)
		if ns == "" {
			if !errors.Is(err, ErrNoNamespace) {
				t.Fatalf("empty namespace: err = %v", err)
			}
			return
		}
		if err != nil {
			t.Fatalf("Selectors(%+v): %v", w, err)
		}
		seen := map[string]bool{}
		for _, s := range sels {
			if !validSelector(s.GetType(), s.GetValue()) {
				t.Fatalf("invalid selector %q", selectorString(s))
			}
			key, _, _ := strings.Cut(s.GetValue(), ":")
			if seen[key] {
				t.Fatalf("selector key %s twice in %s", key, selectorsString(sels))
			}
			seen[key] = true
		}
		if sels[0].GetValue() != "ns:"+ns {
			t.Fatalf("first selector %q, want ns:%s", selectorString(sels[0]), ns)
		}
		if !seen["sa"] || seen["pod-uid"] != (uid != "") || seen["pod-name"] != (name != "") {
			t.Fatalf("selectors %s for %+v", selectorsString(sels), w)
		}
	})
}
