package k8s

import (
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/client-go/tools/cache"
)

// TrimPod keeps of a Pod only what the compiler and the ipcache read:
// name, namespace, labels, resourceVersion, uid, the bulkhead.io/spiffe-id
// annotation, spec.serviceAccountName, spec.nodeName, spec.hostNetwork, the containers'
// named ports, and status.phase, podIPs and hostIPs. Every pod of the
// cluster is cached, and a full Pod (managedFields, env, volumes, status
// conditions) is several KiB: at 10k pods the trimmed cache is what keeps
// the agent small. It is a cache.TransformFunc; it leaves other objects
// (and cache.DeletedFinalStateUnknown tombstones, whose pod was trimmed
// when it was added) as they are.
func TrimPod(obj any) (any, error) {
	p, ok := obj.(*corev1.Pod)
	if !ok {
		return obj, nil
	}
	out := &corev1.Pod{
		TypeMeta: p.TypeMeta,
		ObjectMeta: metav1.ObjectMeta{
			Name: p.Name, Namespace: p.Namespace, UID: p.UID,
			ResourceVersion: p.ResourceVersion, Labels: p.Labels,
		},
		Spec: corev1.PodSpec{ServiceAccountName: p.Spec.ServiceAccountName, NodeName: p.Spec.NodeName,
			HostNetwork: p.Spec.HostNetwork},
		Status: corev1.PodStatus{
			Phase: p.Status.Phase, PodIP: p.Status.PodIP, PodIPs: p.Status.PodIPs,
			HostIP: p.Status.HostIP, HostIPs: p.Status.HostIPs,
		},
	}
	if v, ok := p.Annotations[spiffeIDAnnotation]; ok {
		out.Annotations = map[string]string{spiffeIDAnnotation: v}
	}
	for _, c := range p.Spec.Containers {
		var ports []corev1.ContainerPort
		for _, cp := range c.Ports {
			if cp.Name != "" { // only named ports are looked up
				ports = append(ports, corev1.ContainerPort{Name: cp.Name, ContainerPort: cp.ContainerPort, Protocol: cp.Protocol})
			}
		}
		if len(ports) > 0 {
			out.Spec.Containers = append(out.Spec.Containers, corev1.Container{Name: c.Name, Ports: ports})
		}
	}
	return out, nil
}

// trimMeta drops managedFields and annotations from any object: the store
// reads neither, and managedFields is often the largest part of an object.
func trimMeta(obj any) (any, error) {
	switch o := obj.(type) {
	case *unstructured.Unstructured:
		unstructured.RemoveNestedField(o.Object, "metadata", "managedFields")
		unstructured.RemoveNestedField(o.Object, "metadata", "annotations")
	case metav1.Object:
		o.SetManagedFields(nil)
		o.SetAnnotations(nil)
	}
	return obj, nil
}

var (
	_ cache.TransformFunc = TrimPod
	_ cache.TransformFunc = trimMeta
)
