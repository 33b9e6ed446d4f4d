package k8s

import (
	"context"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

// RuntimePolicies is the resource of the BulkheadRuntimePolicy CRD.
var RuntimePolicies = schema.GroupVersionResource{Group: "bulkhead.io", Version: "v1alpha1", Resource: "bulkheadruntimepolicies"}

// runtimePolicyCheckEvery is how often the cluster is asked for
// BulkheadRuntimePolicies.
const runtimePolicyCheckEvery = 30 * time.Second

// warnRuntimePolicies says, as an error in the log, that the cluster has
// BulkheadRuntimePolicies: this store does not read them yet, so every pod
// keeps Alert for every rule, and a policy that asks for Block or Kill is
// not enforced. Said when they appear, and again when they are gone; never
// silent. A cluster without the CRD has none.
func (s *Source) warnRuntimePolicies(ctx context.Context, every time.Duration) {
	res := s.cfg.Dynamic.Resource(RuntimePolicies)
	had := false
	t := time.NewTicker(every)
	defer t.Stop()
	for {
		list, err := res.List(ctx, metav1.ListOptions{Limit: 1})
		switch {
		case ctx.Err() != nil:
			return
		case err == nil && len(list.Items) > 0 && !had:
			s.cfg.Logger.Error("the cluster has BulkheadRuntimePolicies, and the Kubernetes store does not read them yet: "+
				"they are not enforced, and every pod gets Alert for every rule (use the dir store for runtime policies)",
				"example", list.Items[0].GetNamespace()+"/"+list.Items[0].GetName())
			had = true
		case err == nil && len(list.Items) == 0 && had:
			s.cfg.Logger.Info("no BulkheadRuntimePolicies left in the cluster")
			had = false
		case err != nil && !apierrors.IsNotFound(err):
			s.cfg.Logger.Warn("cannot list BulkheadRuntimePolicies to check for ones this store does not read", "error", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
