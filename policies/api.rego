# API authorization: may this caller make this call to the hub's HTTP API, on this resource?
#
# The hub only authenticates (an API key gives a subject; no key gives an anonymous one).
# Every role, ownership and tenancy rule of the API is here.
# input:  {"subject":  {"authenticated": bool, "id", "roles", "key_id"},
#          "request":  {"method", "route" (the route template, e.g. "/v1/tasks/{task_id}"),
#                       "params": {...path and query parameters...}, "protocol"},
#          "resource": {"kind": "task", "id", "owner", "state", "agent"}
#                    | {"kind": "tasks"} | {"kind": "agent", "name"} | {"kind": "decision"}
#                    | {"kind": "hub"} | {"kind": "public"}}
# output: decision = {"allow": bool, "reasons": [string],
#                     "scope": "all" | "own"   (list routes: whose tasks the caller sees),
#                     "conceal": bool          (answer a denial as "not found")}
package gateway.api

import rego.v1

roles := {r | some r in input.subject.roles}

# admin holds every role.
has(role) if role in roles

has(_) if "admin" in roles

has_any(wanted) if {
	some role in wanted
	has(role)
}

authenticated if input.subject.authenticated == true

call := sprintf("%s %s", [input.request.method, input.request.route])

# --- which roles each call needs ------------------------------------------------------

# Calls anyone may make, without a key: health, metrics, the API description, the audit
# page (it holds no data; the page asks for an auditor key).
public_calls := {
	"GET /healthz",
	"GET /readyz",
	"GET /metrics",
	"GET /openapi.json",
	"GET /audit",
	"GET /audit/audit.js",
	"GET /audit/audit.css",
}

# Calls that need a key and one of these roles; the owner rules for single tasks are below.
role_calls := {
	"POST /v1/tasks": ["user"],
	"GET /v1/tasks": ["user", "operator", "auditor"],
	"GET /v1/agents": ["*"],
	"GET /v1/agents/{name}": ["*"],
	"GET /v1/decisions": ["auditor"],
	"GET /v1/decisions/verify": ["auditor"],
	"GET /v1/decisions/{decision_id}": ["auditor"],
	"GET /v1/status": ["operator"],
	"POST /v1/admin/reload": ["operator"],
	"POST /v1/admin/mode": ["operator"],
	"POST /v1/admin/identity/rotate": ["operator"],
}

# Calls on one task: who may make them besides the task's owner.
task_calls := {
	"GET /v1/tasks/{task_id}": {"owner_roles": ["*"], "others": ["operator", "auditor"]},
	"DELETE /v1/tasks/{task_id}": {"owner_roles": ["user"], "others": ["operator"]},
}

known_call if call in public_calls

known_call if role_calls[call]

known_call if task_calls[call]

# --- refusals -------------------------------------------------------------------------

deny contains msg if {
	not known_call
	msg := sprintf("no rule allows %s", [call])
}

deny contains "this call needs an API key" if {
	known_call
	not call in public_calls
	not authenticated
}

deny contains msg if {
	authenticated
	wanted := role_calls[call]
	not "*" in wanted
	not has_any(wanted)
	msg := sprintf("%s needs one of the roles %v", [call, wanted])
}

owner if input.resource.owner == input.subject.id

may_as_owner(rule) if {
	owner
	"*" in rule.owner_roles
}

may_as_owner(rule) if {
	owner
	has_any(rule.owner_roles)
}

may_on_task(rule) if may_as_owner(rule)

may_on_task(rule) if has_any(rule.others)

deny contains msg if {
	authenticated
	rule := task_calls[call]
	owner
	not may_on_task(rule)
	msg := sprintf("%s on your own task needs one of the roles %v", [call, rule.owner_roles])
}

deny contains msg if {
	authenticated
	rule := task_calls[call]
	not owner
	not may_on_task(rule)
	msg := sprintf("task %s belongs to another subject; %s needs one of the roles %v", [input.resource.id, call, rule.others])
}

# --- the answer -----------------------------------------------------------------------

# A caller who may not see a task is told it does not exist, so task ids leak nothing.
sees_task if owner

sees_task if has_any(task_calls["GET /v1/tasks/{task_id}"].others)

default conceal := false

conceal if {
	task_calls[call]
	not sees_task
}

# Operators and auditors list every task; everyone else only their own.
scope := "all" if has_any(["operator", "auditor"])

else := "own"

decision := {
	"allow": count(deny) == 0,
	"reasons": sort([r | some r in deny]),
	"scope": scope,
	"conceal": conceal,
}
