package adopt

import (
	"context"
	"errors"
	"slices"
	"testing"

	"github.com/bulkhead-io/bulkhead/agent/api"
)

type fakeHost struct {
	pods    []Pod
	adopted []string
	adopt   func(api.EndpointAddRequest) error
}

// Candidates are the pods not adopted yet, as the agent's are.
func (h *fakeHost) Candidates() []Pod {
	var out []Pod
	for _, p := range h.pods {
		if !slices.Contains(h.adopted, p.Name) {
			out = append(out, p)
		}
	}
	return out
}
func (h *fakeHost) Adopt(_ context.Context, req api.EndpointAddRequest) error {
	if err := h.adopt(req); err != nil {
		return err
	}
	h.adopted = append(h.adopted, req.Pod.Name)
	return nil
}

// TestPass: found pods are adopted; those that cannot be found or adopted
// are problems until they can be or stop being candidates; one an ADD
// enforced first is neither.
func TestPass(t *testing.T) {
	h := &fakeHost{pods: []Pod{{Namespace: "s", Name: "a"}, {Namespace: "s", Name: "lost"}, {Namespace: "s", Name: "raced"}, {Namespace: "s", Name: "broken"}}}
	h.adopt = func(r api.EndpointAddRequest) error {
		switch r.Pod.Name {
		case "raced":
			return ErrEnforced
		case "broken":
			return errors.New("attach failed")
		}
		return nil
	}
	find := func(p Pod) (Found, error) {
		if p.Name == "lost" {
			return Found{}, errors.New("no route to 10.0.0.9")
		}
		return Found{Request: api.EndpointAddRequest{Pod: api.PodRef{Namespace: p.Namespace, Name: p.Name}}}, nil
	}
	a := New(Config{Host: h, Find: find})
	a.Pass(t.Context())
	if len(h.adopted) != 1 || h.adopted[0] != "a" {
		t.Fatalf("adopted %v, want [a]", h.adopted)
	}
	probs := a.Problems()
	if len(probs) != 2 || probs[0].Pod.Name != "broken" || probs[1].Pod.Name != "lost" || probs[1].Reason != "no route to 10.0.0.9" {
		t.Fatalf("problems = %+v", probs)
	}
	since := probs[1].Since
	a.Pass(t.Context())
	if p := a.Problems(); len(p) != 2 || !p[1].Since.Equal(since) {
		t.Fatalf("a lasting problem keeps its start: %+v", p)
	}
	h.pods = h.pods[:1] // only the adopted one is left
	a.Pass(t.Context())
	if p := a.Problems(); len(p) != 0 {
		t.Fatalf("problems of pods no longer candidates stay: %+v", p)
	}
	if n, passes := a.Stats(); n != 1 || passes != 3 {
		t.Fatalf("stats = %d adopted, %d passes", n, passes)
	}
}
