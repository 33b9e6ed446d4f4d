package flows

import (
	"cmp"
	"encoding/json"
	"path"
	"strconv"

	"github.com/bulkhead-io/bulkhead/runtime/detect"
)

// OCSF Detection Finding (class 2004, category 2 Findings) identifiers
// used here, from OCSF 1.1.0 (the version of the Network Activity records).
const (
	ocsfClassDetectionFinding = 2004
	ocsfCategoryFindings      = 2
	ocsfActivityCreate        = 1
	ocsfFindingStatusNew      = 1

	ocsfActionAllowed = 1
	ocsfActionDenied  = 2

	ocsfDispositionBlocked      = 2
	ocsfDispositionCustomAction = 7
	ocsfDispositionAlert        = 19
)

// OCSFFinding is a runtime alert as an OCSF Detection Finding. The Security
// Control profile carries the answer (action_id, disposition_id), and its
// attacks are also in finding_info, as the class asks.
type OCSFFinding struct {
	ClassUID     int    `json:"class_uid"`
	ClassName    string `json:"class_name"`
	CategoryUID  int    `json:"category_uid"`
	CategoryName string `json:"category_name"`
	TypeUID      int    `json:"type_uid"`
	ActivityID   int    `json:"activity_id"`
	ActivityName string `json:"activity_name"`
	// Time is when the alert was raised; StartTime and EndTime bound the
	// events an aggregated alert stands for, Count how many there were.
	Time      int64  `json:"time"`
	StartTime int64  `json:"start_time,omitempty"`
	EndTime   int64  `json:"end_time,omitempty"`
	Count     int    `json:"count"`
	Severity  string `json:"severity"`
	// SeverityID: medium 3, high 4, critical 5.
	SeverityID    int                `json:"severity_id"`
	StatusID      int                `json:"status_id"`
	Status        string             `json:"status"`
	StatusDetail  string             `json:"status_detail,omitempty"`
	ActionID      int                `json:"action_id"`
	Action        string             `json:"action"`
	DispositionID int                `json:"disposition_id"`
	Disposition   string             `json:"disposition"`
	Message       string             `json:"message"`
	Metadata      ocsfFindingMeta    `json:"metadata"`
	FindingInfo   ocsfFindingInfo    `json:"finding_info"`
	Attacks       []ocsfAttack       `json:"attacks"`
	Resources     []ocsfResource     `json:"resources,omitempty"`
	Actor         *ocsfActor         `json:"actor,omitempty"`
	Unmapped      ocsfAlertUnmapped  `json:"unmapped"`
	Evidences     []ocsfEvidenceItem `json:"evidences,omitempty"`
}

type ocsfFindingMeta struct {
	Version string      `json:"version"`
	Product ocsfProduct `json:"product"`
}

type ocsfFindingInfo struct {
	// UID is the rule ID, Title the rule's name.
	UID           string       `json:"uid"`
	Title         string       `json:"title"`
	Analytic      ocsfAnalytic `json:"analytic"`
	Attacks       []ocsfAttack `json:"attacks"`
	FirstSeenTime int64        `json:"first_seen_time,omitempty"`
	LastSeenTime  int64        `json:"last_seen_time,omitempty"`
}

type ocsfAnalytic struct {
	UID    string `json:"uid"`
	Name   string `json:"name"`
	TypeID int    `json:"type_id"` // 1: Rule
	Type   string `json:"type"`
}

type ocsfAttack struct {
	Technique ocsfTechnique `json:"technique"`
}

type ocsfTechnique struct {
	UID  string `json:"uid"`
	Name string `json:"name"`
}

// ocsfResource is the pod: its name, its namespace, and its SPIFFE ID as
// the uid when it has one.
type ocsfResource struct {
	UID       string `json:"uid,omitempty"`
	Name      string `json:"name"`
	Namespace string `json:"namespace,omitempty"`
	Type      string `json:"type"`
}

type ocsfActor struct {
	Process *ocsfProcess `json:"process,omitempty"`
}

type ocsfEvidenceItem struct {
	Process *ocsfProcess `json:"process,omitempty"`
}

// ocsfProcess is a process with its parents as parent_process, the nearest
// first, and every ancestor's executable in lineage.
type ocsfProcess struct {
	PID     uint32       `json:"pid"`
	TID     uint32       `json:"tid,omitempty"`
	Name    string       `json:"name,omitempty"`
	CmdLine string       `json:"cmd_line,omitempty"`
	File    *ocsfFile    `json:"file,omitempty"`
	User    ocsfUser     `json:"user"`
	Parent  *ocsfProcess `json:"parent_process,omitempty"`
	Lineage []string     `json:"lineage,omitempty"`
}

type ocsfFile struct {
	Name   string `json:"name"`
	Path   string `json:"path"`
	TypeID int    `json:"type_id"` // 1: Regular File
}

type ocsfUser struct {
	UID string `json:"uid"`
}

// ocsfAlertUnmapped carries what OCSF 1.1.0 has no attribute for in this
// class, under the native alert's names: the syscall and its arguments, the
// action as Bulkhead names it, and where the event came from.
type ocsfAlertUnmapped struct {
	Syscall       string            `json:"syscall"`
	Args          map[string]string `json:"args,omitempty"`
	Action        string            `json:"action"`
	ActionResult  string            `json:"action_result,omitempty"`
	Quarantine    string            `json:"quarantine,omitempty"`
	Endpoint      string            `json:"endpoint,omitempty"`
	NetnsInode    uint32            `json:"netns_inode"`
	CgroupID      uint64            `json:"cgroup_id"`
	Comm          string            `json:"comm"`
	PPID          uint32            `json:"ppid"`
	ArgvTruncated bool              `json:"argv_truncated,omitempty"`
}

// severityID maps an alert's severity to OCSF's.
func severityID(s detect.Severity) (int, string) {
	switch s {
	case detect.SeverityMedium:
		return 3, "Medium"
	case detect.SeverityHigh:
		return 4, "High"
	case detect.SeverityCritical:
		return 5, "Critical"
	}
	return 0, "Unknown"
}

// AlertToOCSF maps a runtime alert to an OCSF Detection Finding (Create,
// status New). Alert is action Allowed, disposition Alert (the syscall ran);
// Block is Denied, Blocked (the caller saw EPERM); Kill is Allowed (the
// syscall ran first), Custom Action, with the signal's fate in status_detail.
func AlertToOCSF(al *detect.Alert) *OCSFFinding {
	e := &OCSFFinding{
		ClassUID: ocsfClassDetectionFinding, ClassName: "Detection Finding",
		CategoryUID: ocsfCategoryFindings, CategoryName: "Findings",
		ActivityID: ocsfActivityCreate, ActivityName: "Create",
		TypeUID:  ocsfClassDetectionFinding*100 + ocsfActivityCreate,
		Time:     al.Time.UnixMilli(),
		Count:    max(al.Count, 1),
		StatusID: ocsfFindingStatusNew, Status: "New", StatusDetail: al.ActionResult,
		Message:  al.Rule + " in " + podLabel(al.Pod) + " (" + al.Syscall + ", pid " + strconv.FormatUint(uint64(al.PID), 10) + ", " + al.Action + ")",
		Metadata: ocsfFindingMeta{Version: ocsfSchemaVersion, Product: ocsfProduct{Name: "Bulkhead", VendorName: "Bulkhead"}},
		Unmapped: ocsfAlertUnmapped{
			Syscall: al.Syscall, Args: al.Args, Action: al.Action, ActionResult: al.ActionResult, Quarantine: al.Quarantine,
			Endpoint: al.Pod.ID, NetnsInode: al.Pod.Netns, CgroupID: al.CgroupID, Comm: al.Comm, PPID: al.PPID,
		},
	}
	e.SeverityID, e.Severity = severityID(al.Severity)
	switch al.Action {
	case detect.ActionBlock:
		e.ActionID, e.Action, e.DispositionID, e.Disposition = ocsfActionDenied, "Denied", ocsfDispositionBlocked, "Blocked"
	case detect.ActionKill:
		e.ActionID, e.Action, e.DispositionID, e.Disposition = ocsfActionAllowed, "Allowed", ocsfDispositionCustomAction, "Custom Action"
	default:
		e.ActionID, e.Action, e.DispositionID, e.Disposition = ocsfActionAllowed, "Allowed", ocsfDispositionAlert, "Alert"
	}
	attacks := []ocsfAttack{{Technique: ocsfTechnique{UID: al.Technique, Name: al.TechniqueName}}}
	e.Attacks = attacks
	e.FindingInfo = ocsfFindingInfo{
		UID: cmp.Or(al.ID, al.RuleID), Title: al.Rule, Attacks: attacks,
		Analytic: ocsfAnalytic{UID: al.RuleID, Name: al.Rule, TypeID: 1, Type: "Rule"},
	}
	if al.FirstTime != nil && al.LastTime != nil {
		e.StartTime, e.EndTime = al.FirstTime.UnixMilli(), al.LastTime.UnixMilli()
		e.FindingInfo.FirstSeenTime, e.FindingInfo.LastSeenTime = e.StartTime, e.EndTime
	}
	if al.Pod.Pod != "" {
		e.Resources = []ocsfResource{{UID: al.Pod.SPIFFEID, Name: al.Pod.Pod, Namespace: al.Pod.Namespace, Type: "Pod"}}
	}
	if al.Process != nil {
		e.Unmapped.ArgvTruncated = al.Process.ArgvTruncated
	}
	proc := alertProcess(al)
	e.Actor = &ocsfActor{Process: proc}
	e.Evidences = []ocsfEvidenceItem{{Process: proc}}
	return e
}

// alertProcess is the caller with its known ancestry: from the process
// cache when the process exec'd in the pod, else what the event itself said.
func alertProcess(al *detect.Alert) *ocsfProcess {
	self := &ocsfProcess{PID: al.PID, TID: al.TID, Name: al.Comm, User: ocsfUser{UID: strconv.FormatUint(uint64(al.UID), 10)}}
	if al.Process != nil {
		fillProcess(self, al.Process)
		self.PID, self.Name = al.PID, al.Comm
	}
	if al.PPID != 0 {
		self.Parent = &ocsfProcess{PID: al.PPID}
	}
	cur := self
	for i := range al.Ancestors {
		p := &ocsfProcess{}
		fillProcess(p, &al.Ancestors[i])
		cur.Parent = p
		cur = p
		if al.Ancestors[i].Exe != "" {
			self.Lineage = append(self.Lineage, al.Ancestors[i].Exe)
		}
	}
	return self
}

func fillProcess(dst *ocsfProcess, p *detect.Process) {
	dst.PID = p.PID
	dst.User = ocsfUser{UID: strconv.FormatUint(uint64(p.UID), 10)}
	if p.Exe != "" {
		dst.Name = path.Base(p.Exe)
		dst.File = &ocsfFile{Name: path.Base(p.Exe), Path: p.Exe, TypeID: 1}
	}
	if len(p.Argv) > 0 {
		dst.CmdLine = joinArgv(p.Argv)
	}
}

func joinArgv(argv []string) string {
	n := 0
	for _, a := range argv {
		n += len(a) + 1
	}
	b := make([]byte, 0, n)
	for i, a := range argv {
		if i > 0 {
			b = append(b, ' ')
		}
		b = append(b, a...)
	}
	return string(b)
}

func podLabel(ep detect.Endpoint) string {
	if ep.Pod == "" {
		return "netns " + strconv.FormatUint(uint64(ep.Netns), 10)
	}
	return ep.Namespace + "/" + ep.Pod
}

// AppendAlertOCSF appends al as one OCSF Detection Finding JSON object.
func AppendAlertOCSF(dst []byte, al *detect.Alert) ([]byte, error) {
	b, err := json.Marshal(AlertToOCSF(al))
	if err != nil {
		return dst, err
	}
	return append(dst, b...), nil
}
