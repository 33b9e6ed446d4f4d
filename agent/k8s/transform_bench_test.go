package k8s

import (
	"fmt"
	"runtime"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// realisticPod is a pod as a Deployment's ReplicaSet and kubelet leave it.
func realisticPod(i int) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{
			Name: fmt.Sprintf("web-7d9f8c6b5-%05d", i), Namespace: fmt.Sprintf("ns-%02d", i%100), UID: "0d8f3c1e-4f1a-4c9e-9d1b-6a5e2f7c8b90",
			ResourceVersion: "123456", GenerateName: "web-7d9f8c6b5-",
			Labels:          map[string]string{"app": "web", "pod-template-hash": "7d9f8c6b5", "tier": "frontend"},
			Annotations:     map[string]string{"kubectl.kubernetes.io/restartedAt": "2026-12-01T10:00:00Z", "prometheus.io/scrape": "true"},
			OwnerReferences: []metav1.OwnerReference{{APIVersion: "apps/v1", Kind: "ReplicaSet", Name: "web-7d9f8c6b5", UID: "u"}},
			ManagedFields: []metav1.ManagedFieldsEntry{
				{Manager: "kube-controller-manager", Operation: metav1.ManagedFieldsOperationUpdate, APIVersion: "v1",
					FieldsV1: metav1.NewFieldsV1(fmt.Sprintf("%01500d", i))},
				{Manager: "kubelet", Operation: metav1.ManagedFieldsOperationUpdate, APIVersion: "v1", Subresource: "status",
					FieldsV1: metav1.NewFieldsV1(fmt.Sprintf("%01200d", i))},
			},
		},
		Spec: corev1.PodSpec{
			ServiceAccountName: "web", NodeName: "node-1",
			Volumes: []corev1.Volume{{Name: "kube-api-access-abcde"}, {Name: "config"}},
			Containers: []corev1.Container{{
				Name: "web", Image: "registry.example/web:1.2.3",
				Env:          []corev1.EnvVar{{Name: "A", Value: "1"}, {Name: "B", Value: "2"}, {Name: "C", Value: "3"}},
				Ports:        []corev1.ContainerPort{{Name: "http", ContainerPort: 8080, Protocol: corev1.ProtocolTCP}},
				VolumeMounts: []corev1.VolumeMount{{Name: "kube-api-access-abcde", MountPath: "/var/run/secrets/kubernetes.io/serviceaccount"}},
				Args:         []string{"--listen", ":8080", "--log-level", "info"},
			}},
			Tolerations: []corev1.Toleration{{Key: "node.kubernetes.io/not-ready"}, {Key: "node.kubernetes.io/unreachable"}},
		},
		Status: corev1.PodStatus{
			Phase: corev1.PodRunning, PodIP: "10.0.0.1", PodIPs: []corev1.PodIP{{IP: "10.0.0.1"}},
			HostIP: "192.0.2.1", HostIPs: []corev1.HostIP{{IP: "192.0.2.1"}},
			Conditions: []corev1.PodCondition{{Type: corev1.PodReady}, {Type: corev1.PodInitialized}, {Type: corev1.ContainersReady}, {Type: corev1.PodScheduled}},
			ContainerStatuses: []corev1.ContainerStatus{{Name: "web", Image: "registry.example/web:1.2.3",
				ImageID:     "registry.example/web@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
				ContainerID: "containerd://0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"}},
		},
	}
}

// BenchmarkPodCacheBytes reports the heap that 10,000 cached pods take,
// full and trimmed (bytes/pod), and their ratio.
func BenchmarkPodCacheBytes(b *testing.B) {
	const n = 10000
	heapOf := func(trim bool) float64 {
		runtime.GC()
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		keep := make([]any, n)
		for i := range keep {
			var obj any = realisticPod(i)
			if trim {
				obj, _ = TrimPod(obj)
			}
			keep[i] = obj
		}
		runtime.GC()
		runtime.ReadMemStats(&after)
		runtime.KeepAlive(keep)
		return float64(after.HeapAlloc-before.HeapAlloc) / n
	}
	var full, trimmed float64
	for range b.N {
		full, trimmed = heapOf(false), heapOf(true)
	}
	b.ReportMetric(full, "full-B/pod")
	b.ReportMetric(trimmed, "trimmed-B/pod")
	b.ReportMetric(trimmed/full, "trimmed/full")
}
