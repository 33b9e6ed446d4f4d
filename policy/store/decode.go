package store

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"strconv"
	"strings"

	"github.com/bulkhead-io/bulkhead/policy"
	"github.com/bulkhead-io/bulkhead/policy/api/v1alpha1"
	"go.yaml.in/yaml/v3"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
)

// Object is one decoded document and where it came from.
type Object struct {
	File string
	Line int
	Kind string
	// Exactly one of these is set, by Kind.
	Namespace       *policy.Namespace
	Pod             *policy.Pod
	NetworkPolicy   *networkingv1.NetworkPolicy
	BulkheadPolicy  *v1alpha1.BulkheadPolicy
	node            *yaml.Node
	namespace, name string
}

// Ref is "Kind namespace/name" (or "Kind name" for namespaces).
func (o *Object) Ref() string {
	if o.namespace == "" {
		return o.Kind + " " + o.name
	}
	return o.Kind + " " + o.namespace + "/" + o.name
}

// Error is a problem at a place in a file.
type Error struct {
	File string
	Line int
	Err  error
}

func (e *Error) Error() string { return fmt.Sprintf("%s:%d: %v", e.File, e.Line, e.Err) }
func (e *Error) Unwrap() error { return e.Err }

type typeMeta struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
}

// Parse decodes every document of one file. It returns the documents that
// decoded and an error (a join of *Error) for those that did not.
func Parse(file string, data []byte) ([]*Object, error) {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	var objs []*Object
	var errs []error
	for {
		var doc yaml.Node
		err := dec.Decode(&doc)
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			// The YAML decoder cannot resynchronise after a syntax error.
			errs = append(errs, &Error{File: file, Line: yamlErrLine(err), Err: fmt.Errorf("parse yaml: %w", err)})
			break
		}
		if len(doc.Content) == 0 || (doc.Content[0].Kind == yaml.ScalarNode && doc.Content[0].Tag == "!!null") {
			continue
		}
		root := doc.Content[0]
		o, err := decodeDoc(root)
		if err != nil {
			errs = append(errs, &Error{File: file, Line: root.Line, Err: err})
			continue
		}
		o.File, o.Line, o.node = file, root.Line, root
		objs = append(objs, o)
	}
	return objs, errors.Join(errs...)
}

func yamlErrLine(err error) int {
	// yaml.v3 reports "yaml: line N: ..."; fall back to line 1.
	s := err.Error()
	if i := strings.Index(s, "line "); i >= 0 {
		rest := s[i+5:]
		if j := strings.IndexAny(rest, ":"); j > 0 {
			if n, err := strconv.Atoi(rest[:j]); err == nil {
				return n
			}
		}
	}
	return 1
}

func decodeDoc(root *yaml.Node) (*Object, error) {
	if root.Kind != yaml.MappingNode {
		return nil, errors.New("document is not an object")
	}
	var v any
	if err := root.Decode(&v); err != nil {
		return nil, fmt.Errorf("decode: %w", err)
	}
	raw, err := json.Marshal(v)
	if err != nil {
		return nil, fmt.Errorf("decode: %w", err)
	}
	var tm typeMeta
	if err := json.Unmarshal(raw, &tm); err != nil {
		return nil, fmt.Errorf("decode apiVersion/kind: %w", err)
	}
	o := &Object{Kind: tm.Kind}
	switch tm.APIVersion + " " + tm.Kind {
	case "v1 Namespace":
		var n corev1.Namespace
		if err := json.Unmarshal(raw, &n); err != nil {
			return nil, fmt.Errorf("decode Namespace: %w", err)
		}
		if n.Name == "" {
			return nil, fmt.Errorf("%s: metadata.name is required", tm.Kind)
		}
		o.name = n.Name
		o.Namespace = &policy.Namespace{Name: n.Name, Labels: n.Labels}
	case "v1 Pod":
		// Pods are decoded leniently: a full pod manifest carries many
		// fields that policy does not use.
		var p corev1.Pod
		if err := json.Unmarshal(raw, &p); err != nil {
			return nil, fmt.Errorf("decode Pod: %w", err)
		}
		pod, err := podOf(&p)
		if err != nil {
			return nil, fmt.Errorf("%s %s/%s: %w", tm.Kind, namespaceOr(p.Namespace), p.Name, err)
		}
		o.namespace, o.name = pod.Namespace, pod.Name
		o.Pod = pod
	case "networking.k8s.io/v1 NetworkPolicy":
		var np networkingv1.NetworkPolicy
		if err := strictUnmarshal(raw, &np); err != nil {
			return nil, fmt.Errorf("decode NetworkPolicy: %w", err)
		}
		if np.Namespace == "" {
			np.Namespace = "default"
		}
		o.namespace, o.name = np.Namespace, np.Name
		o.NetworkPolicy = &np
	case v1alpha1.APIVersion + " " + v1alpha1.Kind:
		var bp v1alpha1.BulkheadPolicy
		if err := strictUnmarshal(raw, &bp); err != nil {
			return nil, fmt.Errorf("decode BulkheadPolicy: %w", err)
		}
		if bp.Namespace == "" {
			bp.Namespace = "default"
		}
		o.namespace, o.name = bp.Namespace, bp.Name
		o.BulkheadPolicy = &bp
	default:
		return nil, fmt.Errorf("unsupported apiVersion %q kind %q (want v1 Namespace, v1 Pod, networking.k8s.io/v1 NetworkPolicy or %s %s)",
			tm.APIVersion, tm.Kind, v1alpha1.APIVersion, v1alpha1.Kind)
	}
	return o, nil
}

// strictUnmarshal rejects unknown fields: in a policy, a misspelt field
// silently widens or narrows what it allows.
func strictUnmarshal(raw []byte, v any) error {
	d := json.NewDecoder(bytes.NewReader(raw))
	d.DisallowUnknownFields()
	return d.Decode(v)
}

func podOf(p *corev1.Pod) (*policy.Pod, error) {
	if p.Name == "" {
		return nil, errors.New("metadata.name is required")
	}
	out := &policy.Pod{Namespace: namespaceOr(p.Namespace), Name: p.Name, Labels: p.Labels, ServiceAccount: p.Spec.ServiceAccountName}
	for ci, c := range p.Spec.Containers {
		for pi, cp := range c.Ports {
			if cp.Name == "" {
				continue
			}
			proto := policy.ProtoTCP
			switch cp.Protocol {
			case "", corev1.ProtocolTCP:
			case corev1.ProtocolUDP:
				proto = policy.ProtoUDP
			case corev1.ProtocolSCTP:
				proto = policy.ProtoSCTP
			default:
				return nil, fmt.Errorf("spec.containers[%d].ports[%d].protocol: unsupported %q", ci, pi, cp.Protocol)
			}
			if cp.ContainerPort < 1 || cp.ContainerPort > 65535 {
				return nil, fmt.Errorf("spec.containers[%d].ports[%d].containerPort: %d out of range", ci, pi, cp.ContainerPort)
			}
			out.Ports = append(out.Ports, policy.NamedPort{Name: cp.Name, Port: uint16(cp.ContainerPort), Proto: proto})
		}
	}
	ips := p.Status.PodIPs
	if len(ips) == 0 && p.Status.PodIP != "" {
		ips = []corev1.PodIP{{IP: p.Status.PodIP}}
	}
	if p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
		// A terminal pod's addresses are free for IPAM to hand out again:
		// they must not claim the next pod's traffic.
		ips = nil
	}
	for i, ip := range ips {
		a, err := netip.ParseAddr(ip.IP)
		if err != nil {
			return nil, fmt.Errorf("status.podIPs[%d]: %w", i, err)
		}
		out.IPs = append(out.IPs, a.Unmap())
	}
	return out, nil
}

// namespaceOr defaults an empty namespace the way kubectl does.
func namespaceOr(ns string) string {
	if ns == "" {
		return "default"
	}
	return ns
}
