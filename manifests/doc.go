// Package manifests holds what a cluster installs: the CRDs (generated from
// policy/api/v1alpha1), the Helm chart in helm/bulkhead and install.yaml,
// the chart rendered with its default values. It has no Go code; its tests
// check the chart and the rendered manifests against the agent they deploy.
package manifests
