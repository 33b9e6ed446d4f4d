package install

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path/filepath"
	"slices"
	"unicode/utf8"
)

// PluginType is the "type" of bulkhead-cni's entry in a conflist.
const PluginType = "bulkhead-cni"

// supportedVersions are the CNI spec versions bulkhead-cni speaks
// (DESIGN.md §5). cni.SupportedVersions says the same; this package does not
// import the plugin package, which links the agent API client.
var supportedVersions = []string{"0.3.1", "0.4.0", "1.0.0", "1.1.0"}

// SupportedVersions returns the CNI spec versions a conflist may declare for
// bulkhead-cni to be chained into it.
func SupportedVersions() []string { return slices.Clone(supportedVersions) }

// ErrMalformed is wrapped by errors about a config file that is not valid
// for the runtime; the file is left as it is.
var ErrMalformed = errors.New("malformed CNI config")

// ErrUnsupportedVersion is wrapped when the primary config declares a CNI
// spec version bulkhead-cni does not speak.
var ErrUnsupportedVersion = errors.New("unsupported cniVersion")

// field is one member of a JSON object, its value kept as it was written.
type field struct {
	key string
	val json.RawMessage
}

// object is a JSON object that keeps its members' order and their values'
// exact text, so that what this package does not touch stays as written.
type object []field

func (o object) get(key string) (json.RawMessage, bool) {
	for _, f := range o {
		if f.key == key {
			return f.val, true
		}
	}
	return nil, false
}

// set replaces key's value in place, or appends it.
func (o object) set(key string, val json.RawMessage) object {
	for i := range o {
		if o[i].key == key {
			o[i].val = val
			return o
		}
	}
	return append(o, field{key, val})
}

func (o object) del(key string) object {
	return slices.DeleteFunc(o, func(f field) bool { return f.key == key })
}

// parseObject reads one JSON object. Duplicate members are refused: which one
// a runtime would use depends on its parser.
func parseObject(data []byte) (object, error) {
	if !json.Valid(data) {
		// json.Unmarshal says where the syntax breaks.
		var v any
		err := json.Unmarshal(data, &v)
		if err == nil {
			err = errors.New("invalid JSON")
		}
		return nil, err
	}
	dec := json.NewDecoder(bytes.NewReader(data))
	tok, err := dec.Token()
	if err != nil {
		return nil, err
	}
	if d, ok := tok.(json.Delim); !ok || d != '{' {
		return nil, errors.New("not a JSON object")
	}
	var o object
	seen := map[string]bool{}
	for dec.More() {
		tok, err := dec.Token()
		if err != nil {
			return nil, err
		}
		key, _ := tok.(string)
		if seen[key] {
			return nil, fmt.Errorf("duplicate key %q", key)
		}
		seen[key] = true
		var val json.RawMessage
		if err := dec.Decode(&val); err != nil {
			return nil, err
		}
		o = append(o, field{key, val})
	}
	if _, err := dec.Token(); err != nil { // the closing brace
		return nil, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, errors.New("data after the JSON object")
	}
	return o, nil
}

// marshal writes the object indented by two spaces, with a final newline.
// Values keep their text (numbers their precision, strings their escapes);
// only the whitespace between tokens changes.
func (o object) marshal() []byte {
	var b bytes.Buffer
	b.WriteByte('{')
	for i, f := range o {
		if i > 0 {
			b.WriteByte(',')
		}
		b.Write(quote(f.key))
		b.WriteByte(':')
		b.Write(f.val)
	}
	b.WriteByte('}')
	var out bytes.Buffer
	if err := json.Indent(&out, b.Bytes(), "", "  "); err != nil {
		// Every value came from the decoder, so the text is valid JSON.
		return append(b.Bytes(), '\n')
	}
	out.WriteByte('\n')
	return out.Bytes()
}

// quote is json.Marshal of a string without HTML escaping, so a key reads
// as it was written.
func quote(s string) []byte {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	_ = enc.Encode(s) // a string always encodes
	return bytes.TrimSuffix(b.Bytes(), []byte("\n"))
}

// conflist is a network configuration list: its top-level members in their
// order, and its plugins as written.
type conflist struct {
	top     object
	plugins []json.RawMessage
	types   []string // plugins[i]'s "type"
}

// stringField reads a string member; absent is "".
func stringField(o object, key string) (string, error) {
	raw, ok := o.get(key)
	if !ok {
		return "", nil
	}
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return "", fmt.Errorf("%q is not a string", key)
	}
	return s, nil
}

// pluginType reads a plugin's "type", which the runtime needs to find its
// binary.
func pluginType(raw json.RawMessage) (string, error) {
	o, err := parseObject(raw)
	if err != nil {
		return "", fmt.Errorf("plugin: %w", err)
	}
	t, err := stringField(o, "type")
	if err != nil {
		return "", fmt.Errorf("plugin: %w", err)
	}
	if t == "" {
		return "", errors.New(`plugin without "type"`)
	}
	return t, nil
}

// parseList reads a .conflist.
func parseList(data []byte) (*conflist, error) {
	top, err := parseObject(data)
	if err != nil {
		return nil, err
	}
	raw, ok := top.get("plugins")
	if !ok {
		return nil, errors.New(`no "plugins" list`)
	}
	var plugins []json.RawMessage
	if err := json.Unmarshal(raw, &plugins); err != nil || plugins == nil {
		return nil, errors.New(`"plugins" is not a list`)
	}
	if len(plugins) == 0 {
		// Chaining needs a plugin in front that makes the interface.
		return nil, errors.New(`"plugins" is empty`)
	}
	l := &conflist{top: top, plugins: plugins}
	for i, p := range plugins {
		t, err := pluginType(p)
		if err != nil {
			return nil, fmt.Errorf("plugins[%d]: %w", i, err)
		}
		l.types = append(l.types, t)
	}
	if _, err := stringField(top, "name"); err != nil {
		return nil, err
	}
	if _, err := stringField(top, "cniVersion"); err != nil {
		return nil, err
	}
	return l, nil
}

// fromConf makes a list of a single-plugin .conf: the list keeps the conf's
// name and cniVersion, and its one plugin is the conf, every member as
// written (libcni's ConfListFromConf does the same).
func fromConf(data []byte) (*conflist, error) {
	o, err := parseObject(data)
	if err != nil {
		return nil, err
	}
	if _, ok := o.get("plugins"); ok {
		return nil, errors.New(`a list ("plugins") in a single-plugin config file; name it *.conflist`)
	}
	t, err := pluginType(data)
	if err != nil {
		return nil, err
	}
	var top object
	for _, k := range []string{"cniVersion", "name"} {
		if v, ok := o.get(k); ok {
			top = append(top, field{k, v})
		}
	}
	if _, err := stringField(top, "name"); err != nil {
		return nil, err
	}
	if _, err := stringField(top, "cniVersion"); err != nil {
		return nil, err
	}
	plugin := json.RawMessage(bytes.TrimSpace(data))
	top = append(top, field{"plugins", json.RawMessage("[]")})
	return &conflist{top: top, plugins: []json.RawMessage{plugin}, types: []string{t}}, nil
}

// version checks the list's cniVersion.
func (l *conflist) version() (string, error) {
	v, _ := stringField(l.top, "cniVersion") // checked by the parser
	if v == "" {
		return "", fmt.Errorf(`%w: no "cniVersion" (bulkhead-cni supports %v)`, ErrUnsupportedVersion, supportedVersions)
	}
	if !slices.Contains(supportedVersions, v) {
		return v, fmt.Errorf("%w %q (bulkhead-cni supports %v)", ErrUnsupportedVersion, v, supportedVersions)
	}
	return v, nil
}

// ours returns the indices of bulkhead-cni entries.
func (l *conflist) ours() []int {
	var idx []int
	for i, t := range l.types {
		if t == PluginType {
			idx = append(idx, i)
		}
	}
	return idx
}

// entryMatches says whether our entry carries the socket wanted ("" is no
// "socket" member). Members we do not own (a user's agentWaitSeconds) may be
// there.
func entryMatches(raw json.RawMessage, socket string) bool {
	o, err := parseObject(raw)
	if err != nil {
		return false
	}
	v, ok := o.get("socket")
	if socket == "" {
		return !ok
	}
	var s string
	return ok && json.Unmarshal(v, &s) == nil && s == socket
}

// newEntry is the entry this package appends.
func newEntry(socket string) json.RawMessage {
	o := object{{"type", quote(PluginType)}}
	if socket != "" {
		o = append(o, field{"socket", quote(socket)})
	}
	return json.RawMessage(bytes.TrimSpace(o.marshal()))
}

// ensureEntry makes the list hold exactly one bulkhead-cni entry with the
// socket wanted; it reports whether anything changed. An entry already in
// place keeps its position and the members this package does not own;
// duplicates (from hand edits) are removed, the first one kept.
func (l *conflist) ensureEntry(socket string) bool {
	idx := l.ours()
	if len(idx) == 0 {
		l.plugins = append(l.plugins, newEntry(socket))
		l.types = append(l.types, PluginType)
		return true
	}
	changed := false
	first := idx[0]
	if !entryMatches(l.plugins[first], socket) {
		o, err := parseObject(l.plugins[first])
		if err != nil {
			o = object{{"type", quote(PluginType)}}
		}
		if socket == "" {
			o = o.del("socket")
		} else {
			o = o.set("socket", quote(socket))
		}
		l.plugins[first] = json.RawMessage(bytes.TrimSpace(o.marshal()))
		changed = true
	}
	for _, i := range slices.Backward(idx[1:]) {
		l.plugins = slices.Delete(l.plugins, i, i+1)
		l.types = slices.Delete(l.types, i, i+1)
		changed = true
	}
	return changed
}

// removeEntry drops every bulkhead-cni entry; it reports whether there was
// one.
func (l *conflist) removeEntry() bool {
	idx := l.ours()
	for _, i := range slices.Backward(idx) {
		l.plugins = slices.Delete(l.plugins, i, i+1)
		l.types = slices.Delete(l.types, i, i+1)
	}
	return len(idx) > 0
}

// marshal writes the list with its plugins in place of the original
// "plugins" member.
func (l *conflist) marshal() []byte {
	var b bytes.Buffer
	b.WriteByte('[')
	for i, p := range l.plugins {
		if i > 0 {
			b.WriteByte(',')
		}
		b.Write(p)
	}
	b.WriteByte(']')
	top := slices.Clone(l.top).set("plugins", json.RawMessage(b.Bytes()))
	return top.marshal()
}

// insert is the pure core of Install for one file's content: it returns the
// conflist with bulkhead-cni's entry in place, and whether it differs from
// what the file holds. isList says the file is a .conflist; otherwise it is
// a single-plugin config to convert (and always "changed").
func insert(data []byte, isList bool, socket string) (out []byte, changed bool, err error) {
	if err := checkSocket(socket); err != nil {
		return nil, false, err
	}
	var l *conflist
	if isList {
		l, err = parseList(data)
	} else {
		l, err = fromConf(data)
	}
	if err != nil {
		return nil, false, fmt.Errorf("%w: %w", ErrMalformed, err)
	}
	if _, err := l.version(); err != nil {
		return nil, false, err
	}
	changed = l.ensureEntry(socket) || !isList
	if !changed {
		return data, false, nil
	}
	return l.marshal(), true, nil
}

// checkSocket refuses a socket the plugin could not use: the entry must say
// what the agent listens on, not what JSON turns an invalid name into.
func checkSocket(socket string) error {
	if socket == "" {
		return nil
	}
	if !utf8.ValidString(socket) || !filepath.IsAbs(socket) {
		return fmt.Errorf("socket %q: want an absolute path in UTF-8", socket)
	}
	return nil
}
