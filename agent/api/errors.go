package api

import (
	"errors"
	"fmt"
	"net/http"
)

// Code is a machine-readable error class. Clients branch on it, so values
// are part of the versioned API: add new ones, never rename.
type Code string

// Error codes. CodeUnavailable never crosses the wire: the client reports
// it when it cannot reach the agent at all.
const (
	CodeInvalidRequest   Code = "invalid_request"
	CodeNotReady         Code = "not_ready"
	CodeEndpointNotFound Code = "endpoint_not_found"
	CodeConflict         Code = "conflict"
	CodeUnsupported      Code = "unsupported"
	CodeInternal         Code = "internal"
	CodeUnavailable      Code = "unavailable"
)

// Sentinel errors to match with errors.Is; an *Error matches the sentinel
// that has its Code, whatever its message.
var (
	ErrInvalidRequest   = &Error{Code: CodeInvalidRequest}
	ErrNotReady         = &Error{Code: CodeNotReady}
	ErrEndpointNotFound = &Error{Code: CodeEndpointNotFound}
	ErrConflict         = &Error{Code: CodeConflict}
	ErrUnsupported      = &Error{Code: CodeUnsupported}
	ErrInternal         = &Error{Code: CodeInternal}
	ErrUnavailable      = &Error{Code: CodeUnavailable}
)

// Error is the structured error of the API, both on the wire and in Go.
type Error struct {
	Code    Code   `json:"code"`
	Message string `json:"message"`
	cause   error
}

// Errorf builds an *Error; a Backend returns it to choose the code.
func Errorf(code Code, format string, args ...any) *Error {
	err := fmt.Errorf(format, args...)
	return &Error{Code: code, Message: err.Error(), cause: errors.Unwrap(err)}
}

func (e *Error) Error() string {
	if e.Message == "" {
		return string(e.Code)
	}
	return string(e.Code) + ": " + e.Message
}

// Unwrap exposes the local cause (for example the dial error), which is
// never sent over the wire.
func (e *Error) Unwrap() error { return e.cause }

// Is matches any *Error with the same code, so callers can write
// errors.Is(err, api.ErrNotReady).
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.Code == e.Code
}

// CodeOf returns the code of the first *Error in err's chain, CodeInternal
// for any other error, and "" for nil.
func CodeOf(err error) Code {
	if err == nil {
		return ""
	}
	var e *Error
	if errors.As(err, &e) {
		return e.Code
	}
	return CodeInternal
}

// errorBody is the wire form of every non-2xx response.
type errorBody struct {
	Error *Error `json:"error"`
}

func httpStatus(c Code) int {
	switch c {
	case CodeInvalidRequest:
		return http.StatusBadRequest
	case CodeNotReady, CodeUnavailable:
		return http.StatusServiceUnavailable
	case CodeEndpointNotFound:
		return http.StatusNotFound
	case CodeConflict:
		return http.StatusConflict
	case CodeUnsupported:
		return http.StatusNotImplemented
	default:
		return http.StatusInternalServerError
	}
}

// codeForStatus classifies a response whose body is not our error JSON, for
// example the mux's 404 from an older agent that lacks a path.
func codeForStatus(status int) Code {
	switch status {
	case http.StatusBadRequest:
		return CodeInvalidRequest
	case http.StatusServiceUnavailable:
		return CodeNotReady
	case http.StatusNotFound, http.StatusMethodNotAllowed, http.StatusNotImplemented:
		return CodeUnsupported
	case http.StatusConflict:
		return CodeConflict
	default:
		return CodeInternal
	}
}
