package api

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"
	"unicode/utf8"
)

// The quarantine API: a quarantined pod has all its traffic dropped in the
// datapath, but DNS to the node's listed resolvers, until it is released.
// The runtime monitor quarantines a pod when a detection whose action is
// Quarantine fires; an operator may do it by hand.
const (
	// PathQuarantines (GET) lists the quarantined pods of this node.
	PathQuarantines = "/v1/quarantines"
	// PathQuarantineAdd (POST, QuarantineRequest) quarantines a pod.
	PathQuarantineAdd = "/v1/quarantines/add"
	// PathQuarantineRelease (POST, QuarantineReleaseRequest) lifts it.
	PathQuarantineRelease = "/v1/quarantines/release"
)

// Quarantine is one quarantined pod.
type Quarantine struct {
	Pod        PodRef      `json:"pod"`
	Endpoint   EndpointKey `json:"endpoint"`
	EndpointID uint32      `json:"endpointID"`
	// Number is the datapath's handle for it: the rule of its drops.
	Number uint32 `json:"number"`
	// AlertID and RuleID name the alert that quarantined the pod; Reason
	// is the operator's, for one quarantined by hand.
	AlertID string    `json:"alertID,omitempty"`
	RuleID  string    `json:"ruleID,omitempty"`
	Reason  string    `json:"reason,omitempty"`
	Since   time.Time `json:"since"`
}

// QuarantineList is the answer of GET PathQuarantines.
type QuarantineList struct {
	Quarantines []Quarantine `json:"quarantines"`
}

// QuarantineRequest quarantines the pod namespace/name on this node.
type QuarantineRequest struct {
	Pod    PodRef `json:"pod"`
	Reason string `json:"reason"`
}

// maxQuarantineReason bounds an operator's reason: it goes into every
// drop record of the pod.
const maxQuarantineReason = 256

// Validate refuses a request without a pod or a reason.
func (r QuarantineRequest) Validate() error {
	if err := validatePodName(r.Pod); err != nil {
		return err
	}
	if strings.TrimSpace(r.Reason) == "" {
		return errors.New("a reason is required: it is written into every record of a dropped packet")
	}
	if len(r.Reason) > maxQuarantineReason || !utf8.ValidString(r.Reason) || strings.ContainsAny(r.Reason, "\n\r") {
		return fmt.Errorf("reason: at most %d bytes of UTF-8 on one line", maxQuarantineReason)
	}
	return nil
}

// QuarantineReleaseRequest lifts the quarantine of the pod namespace/name.
type QuarantineReleaseRequest struct {
	Pod PodRef `json:"pod"`
}

// Validate refuses a request without a pod.
func (r QuarantineReleaseRequest) Validate() error { return validatePodName(r.Pod) }

func validatePodName(p PodRef) error {
	if p.Namespace == "" || p.Name == "" {
		return errors.New("the pod's namespace and name are required (namespace/name)")
	}
	return nil
}

// QuarantineResponse answers an add or a release: the quarantines changed
// (one per endpoint of the pod on this node), and whether anything
// changed (false: it was already so).
type QuarantineResponse struct {
	Quarantines []Quarantine `json:"quarantines"`
	Changed     bool         `json:"changed"`
}

// Quarantiner is implemented by a Backend that can quarantine pods (an
// agent; the routes answer CodeUnsupported otherwise).
type Quarantiner interface {
	ListQuarantines(ctx context.Context) (QuarantineList, error)
	Quarantine(ctx context.Context, req QuarantineRequest) (QuarantineResponse, error)
	ReleaseQuarantine(ctx context.Context, req QuarantineReleaseRequest) (QuarantineResponse, error)
}

// ListQuarantines asks the agent for its quarantined pods.
func (c *Client) ListQuarantines(ctx context.Context) (QuarantineList, error) {
	var resp QuarantineList
	return resp, c.do(ctx, http.MethodGet, PathQuarantines, nil, &resp)
}

// Quarantine asks the agent to quarantine a pod.
func (c *Client) Quarantine(ctx context.Context, req QuarantineRequest) (QuarantineResponse, error) {
	var resp QuarantineResponse
	return resp, c.do(ctx, http.MethodPost, PathQuarantineAdd, req, &resp)
}

// ReleaseQuarantine asks the agent to lift a pod's quarantine.
func (c *Client) ReleaseQuarantine(ctx context.Context, req QuarantineReleaseRequest) (QuarantineResponse, error) {
	var resp QuarantineResponse
	return resp, c.do(ctx, http.MethodPost, PathQuarantineRelease, req, &resp)
}
