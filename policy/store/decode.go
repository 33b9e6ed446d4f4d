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
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.yaml.in/yaml/v3"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	kjson "sigs.k8s.io/json"
)

// Object is one decoded document and where it came from.
type Object struct {
	// File and Line place the object: a file and line for the dir store,
	// "Kind namespace/name" and no line for the Kubernetes store.
	File string
	Line int
	Kind string
	// Exactly one of these is set, by Kind.
	Namespace       *policy.Namespace
	Pod             *policy.Pod
	NetworkPolicy   *networkingv1.NetworkPolicy
	BulkheadPolicy  *v1alpha1.BulkheadPolicy
	RuntimePolicy   *v1alpha1.BulkheadRuntimePolicy
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

func (e *Error) Error() string {
	if e.Line == 0 {
		// Objects from the apiserver have a name but no line; their
		// validation errors name them already.
		if msg := e.Err.Error(); strings.HasPrefix(msg, e.File+": ") {
			return msg
		}
		return fmt.Sprintf("%s: %v", e.File, e.Err)
	}
	return fmt.Sprintf("%s:%d: %v", e.File, e.Line, e.Err)
}
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
		o, err := decodeDoc(file, root)
		if err != nil {
			errs = append(errs, err)
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

// decodeDoc decodes one document. Its error is a join of *Error, each at
// the line of the field it is about where there is one.
func decodeDoc(file string, root *yaml.Node) (*Object, error) {
	at := func(line int, err error) error { return &Error{File: file, Line: line, Err: err} }
	if root.Kind != yaml.MappingNode {
		return nil, at(root.Line, errors.New("document is not an object"))
	}
	var v any
	if err := root.Decode(&v); err != nil {
		return nil, at(root.Line, fmt.Errorf("decode: %w", err))
	}
	raw, err := json.Marshal(v)
	if err != nil {
		return nil, at(root.Line, fmt.Errorf("decode: %w", err))
	}
	// apiVersion and kind match case-sensitively too: to the apiserver,
	// "Kind: Pod" is no kind at all.
	var tm typeMeta
	if err := kjson.UnmarshalCaseSensitivePreserveInts(raw, &tm); err != nil {
		return nil, at(root.Line, fmt.Errorf("decode apiVersion/kind: %w", err))
	}
	// strict decodes raw into obj as the apiserver does, and places each
	// problem at its field's line.
	strict := func(obj metav1.Object) error {
		errs := strictUnmarshal(raw, obj)
		if len(errs) == 0 {
			return nil
		}
		ref := tm.Kind + " " + obj.GetName()
		if tm.Kind != "Namespace" {
			ref = tm.Kind + " " + namespaceOr(obj.GetNamespace()) + "/" + obj.GetName()
		}
		out := make([]error, len(errs))
		for i, fe := range errs {
			line := root.Line
			if fe.path != "" {
				line = pathLine(root, splitPath(fe.path))
			}
			out[i] = at(line, fmt.Errorf("%s: %w", ref, fe))
		}
		return errors.Join(out...)
	}
	var o *Object
	switch tm.APIVersion + " " + tm.Kind {
	case "v1 Namespace":
		var n corev1.Namespace
		if err := strict(&n); err != nil {
			return nil, err
		}
		no, err := NamespaceObject(&n)
		if err != nil {
			return nil, at(root.Line, err)
		}
		o = no
	case "v1 Pod":
		// A pod manifest as kubectl prints it carries many fields that
		// policy does not use. corev1.Pod knows them all, so it decodes
		// strictly too: a misspelt "Labels" is an error, not labels that
		// the cluster would not have.
		var p corev1.Pod
		if err := strict(&p); err != nil {
			return nil, err
		}
		po, err := PodObject(&p)
		if err != nil {
			return nil, at(root.Line, err)
		}
		o = po
	case "networking.k8s.io/v1 NetworkPolicy":
		var np networkingv1.NetworkPolicy
		if err := strict(&np); err != nil {
			return nil, err
		}
		o = NetworkPolicyObject(&np)
	case v1alpha1.APIVersion + " " + v1alpha1.Kind:
		var bp v1alpha1.BulkheadPolicy
		if err := strict(&bp); err != nil {
			return nil, err
		}
		o = BulkheadPolicyObject(&bp)
	case v1alpha1.APIVersion + " " + v1alpha1.RuntimePolicyKind:
		var rp v1alpha1.BulkheadRuntimePolicy
		if err := strict(&rp); err != nil {
			return nil, err
		}
		o = RuntimePolicyObject(&rp)
	default:
		return nil, at(root.Line, fmt.Errorf("unsupported apiVersion %q kind %q (want v1 Namespace, v1 Pod, networking.k8s.io/v1 NetworkPolicy, or %s %s or %s)",
			tm.APIVersion, tm.Kind, v1alpha1.APIVersion, v1alpha1.Kind, v1alpha1.RuntimePolicyKind))
	}
	return o, nil
}

// decodeError is one problem of a strict decode, at a field path such as
// "spec.ingress[0].from[0].PodSelector" (empty: the document).
type decodeError struct {
	path string
	msg  string
}

func (e *decodeError) Error() string { return e.msg }

// strictUnmarshal decodes raw into v as the apiserver does with strict field
// validation: field names match case-sensitively (encoding/json would take
// "PodSelector" for podSelector, which the apiserver drops, leaving an empty
// selector that selects every pod), and an unknown or duplicate field is an
// error. A misspelt field in a policy would otherwise silently widen or
// narrow what it allows.
func strictUnmarshal(raw []byte, v any) []*decodeError {
	strictErrs, err := kjson.UnmarshalStrict(raw, v)
	if err != nil {
		var te *json.UnmarshalTypeError
		if errors.As(err, &te) && te.Field != "" {
			return []*decodeError{{path: te.Field, msg: fmt.Sprintf("%s: cannot decode %s as %s", te.Field, te.Value, te.Type)}}
		}
		return []*decodeError{{msg: fmt.Sprintf("decode: %v", err)}}
	}
	out := make([]*decodeError, 0, len(strictErrs))
	for _, e := range strictErrs {
		de := &decodeError{msg: e.Error()}
		var fe kjson.FieldError
		if errors.As(e, &fe) {
			de.path = fe.FieldPath()
		}
		out = append(out, de)
	}
	return out
}

// SPIFFEIDAnnotation on a Pod names the SPIFFE ID its node's SVID source
// issued to it, where that differs from the derived
// spiffe://<td>/ns/<ns>/sa/<sa>. Other nodes match the pod by it; on its own
// node the agent's SVID source decides, and the annotation is ignored.
const SPIFFEIDAnnotation = "bulkhead.io/spiffe-id"

func podOf(p *corev1.Pod) (*policy.Pod, error) {
	if p.Name == "" {
		return nil, errors.New("metadata.name is required")
	}
	out := &policy.Pod{Namespace: namespaceOr(p.Namespace), Name: p.Name, Labels: p.Labels, ServiceAccount: p.Spec.ServiceAccountName,
		UID: string(p.UID), NodeName: p.Spec.NodeName}
	if v, ok := p.Annotations[SPIFFEIDAnnotation]; ok {
		id, err := spiffeid.FromString(v)
		if err != nil {
			return nil, fmt.Errorf("metadata.annotations[%s]: %q: %w", SPIFFEIDAnnotation, v, err)
		}
		if err := policy.CheckIssuedID(id, out.Namespace); err != nil {
			return nil, fmt.Errorf("metadata.annotations[%s]: %w", SPIFFEIDAnnotation, err)
		}
		out.SPIFFEID = id.String()
	}
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
	switch {
	case p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed:
		// A terminal pod's addresses are free for IPAM to hand out again:
		// they must not claim the next pod's traffic.
		ips = nil
	case p.Spec.HostNetwork:
		// A host-network pod's addresses are its node's: traffic from them
		// is the host's, not the pod's, and every host-network pod of a
		// node would claim the same ones.
		ips = nil
	}
	for i, ip := range ips {
		a, err := netip.ParseAddr(ip.IP)
		if err != nil {
			return nil, fmt.Errorf("status.podIPs[%d]: %w", i, err)
		}
		out.IPs = append(out.IPs, a.Unmap())
	}
	// The node's addresses stay valid after the pod ends, unlike its own.
	hostField, hips := "status.hostIPs", p.Status.HostIPs
	if len(hips) == 0 && p.Status.HostIP != "" {
		hostField, hips = "status.hostIP", []corev1.HostIP{{IP: p.Status.HostIP}}
	}
	for i, ip := range hips {
		a, err := netip.ParseAddr(ip.IP)
		if err != nil {
			if hostField == "status.hostIP" {
				return nil, fmt.Errorf("%s: %w", hostField, err)
			}
			return nil, fmt.Errorf("%s[%d]: %w", hostField, i, err)
		}
		out.HostIPs = append(out.HostIPs, a.Unmap())
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
