// Package v1alpha1 holds the bulkhead.io/v1alpha1 API types: BulkheadPolicy
// and BulkheadRuntimePolicy.
// The CRD manifest under manifests/crds/ and the deepcopy functions are
// generated from these types by controller-gen.
//
// +kubebuilder:object:generate=true
// +groupName=bulkhead.io
package v1alpha1

//go:generate go tool controller-gen object paths=./...
//go:generate go tool controller-gen crd paths=./... output:crd:artifacts:config=../../../manifests/crds
