package policy

import (
	"errors"
	"fmt"
	"net/netip"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	metav1validation "k8s.io/apimachinery/pkg/apis/meta/v1/validation"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/apimachinery/pkg/util/validation/field"
)

// ErrInvalidPolicy is wrapped by every validation error: the policy was
// rejected whole.
var ErrInvalidPolicy = errors.New("invalid policy")

// ValidationError lists everything wrong with one policy object.
type ValidationError struct {
	Kind, Namespace, Name string
	Errs                  field.ErrorList
}

func (e *ValidationError) Error() string {
	return fmt.Sprintf("%s %s/%s: %v", e.Kind, e.Namespace, e.Name, e.Errs.ToAggregate())
}

func (e *ValidationError) Unwrap() error { return ErrInvalidPolicy }

// selector validates and converts a label selector; nil stays nil.
func selector(s *metav1.LabelSelector, path *field.Path, errs *field.ErrorList) labels.Selector {
	if s == nil {
		return nil
	}
	if es := metav1validation.ValidateLabelSelector(s, metav1validation.LabelSelectorValidationOptions{}, path); len(es) > 0 {
		*errs = append(*errs, es...)
		return nil
	}
	sel, err := metav1.LabelSelectorAsSelector(s)
	if err != nil {
		*errs = append(*errs, field.Invalid(path, s, err.Error()))
		return nil
	}
	return sel
}

// ports validates and converts NetworkPolicyPorts (both APIs use them).
func ports(ps []networkingv1.NetworkPolicyPort, path *field.Path, errs *field.ErrorList) []cport {
	var out []cport
	for i, p := range ps {
		pp := path.Index(i)
		proto := ProtoTCP
		if p.Protocol != nil {
			switch *p.Protocol {
			case corev1.ProtocolTCP:
			case corev1.ProtocolUDP:
				proto = ProtoUDP
			case corev1.ProtocolSCTP:
				proto = ProtoSCTP
			default:
				*errs = append(*errs, field.NotSupported(pp.Child("protocol"), *p.Protocol, []string{"TCP", "UDP", "SCTP"}))
				continue
			}
		}
		c := cport{proto: proto, lo: 0, hi: 65535}
		switch {
		case p.Port == nil:
			if p.EndPort != nil {
				*errs = append(*errs, field.Required(pp.Child("port"), "when endPort is set"))
				continue
			}
		case p.Port.Type == intstr.String:
			if msgs := validation.IsValidPortName(p.Port.StrVal); len(msgs) > 0 {
				*errs = append(*errs, field.Invalid(pp.Child("port"), p.Port.StrVal, msgs[0]))
				continue
			}
			if p.EndPort != nil {
				*errs = append(*errs, field.Invalid(pp.Child("endPort"), *p.EndPort, "must not be set with a named port"))
				continue
			}
			c.name = p.Port.StrVal
		default:
			v := p.Port.IntVal
			if v < 1 || v > 65535 {
				*errs = append(*errs, field.Invalid(pp.Child("port"), v, "must be between 1 and 65535"))
				continue
			}
			c.lo, c.hi = uint16(v), uint16(v)
			if p.EndPort != nil {
				if *p.EndPort < v || *p.EndPort > 65535 {
					*errs = append(*errs, field.Invalid(pp.Child("endPort"), *p.EndPort, "must be between port and 65535"))
					continue
				}
				c.hi = uint16(*p.EndPort)
			}
		}
		out = append(out, c)
	}
	return out
}

// cidrPeer validates an ipBlock (cidr with except) and records its prefixes.
func cidrPeer(cidr string, except []string, path *field.Path, errs *field.ErrorList) (cpeer, bool) {
	c, err := netip.ParsePrefix(cidr)
	if err != nil {
		*errs = append(*errs, field.Invalid(path.Child("cidr"), cidr, "not a CIDR: "+err.Error()))
		return cpeer{}, false
	}
	if c.Addr().Is4In6() {
		// The ipcache keys IPv4 addresses as IPv4: a mapped prefix would
		// match nothing. The CRD's isCIDR() refuses it too.
		*errs = append(*errs, field.Invalid(path.Child("cidr"), cidr, "an IPv4-mapped IPv6 prefix: write it as IPv4"))
		return cpeer{}, false
	}
	c = c.Masked()
	p := cpeer{kind: peerCIDR, cidr: c}
	ok := true
	for i, e := range except {
		ep := path.Child("except").Index(i)
		x, err := netip.ParsePrefix(e)
		if err != nil {
			*errs = append(*errs, field.Invalid(ep, e, "not a CIDR: "+err.Error()))
			ok = false
			continue
		}
		x = x.Masked()
		if x.Addr().Is4In6() || x.Addr().BitLen() != c.Addr().BitLen() || x.Bits() <= c.Bits() || !c.Contains(x.Addr()) {
			*errs = append(*errs, field.Invalid(ep, e, "must be a strict subset of "+cidr))
			ok = false
			continue
		}
		p.except = append(p.except, x)
	}
	return p, ok
}

func (p *cpolicy) addCIDRs(peers []cpeer) {
	for _, pr := range peers {
		if pr.kind == peerCIDR {
			p.cidrs = append(p.cidrs, pr.cidr)
			p.cidrs = append(p.cidrs, pr.except...)
		}
	}
}
