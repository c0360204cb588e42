/* The C core of broker/codecs/lazy.py: LazyValue and DecodedMessage, same semantics.
 *
 * A reader builds one DecodedMessage per stored message and reads ``.value`` once; in
 * Python that costs an ``__init__`` frame (six slot stores) and a property frame around
 * the codec call, about 400 ns, a third of decoding a small JSON event. Here calling the
 * type stores its arguments (vectorcall, no argument tuple) and ``.value`` calls
 * ``codec.decode(body)`` directly (PyObject_VectorcallMethod): no bytecode of ours runs.
 *
 * Semantics, as in lazy.py:
 *   - ``.value`` decodes on first access and caches the value, or the DecodeError, which
 *     every later access raises again (the same instance, its traceback cleared);
 *   - DecodedMessage strips the 5-byte Confluent wire prefix only from a zero-led body of
 *     five or more bytes that publishing framed (by its Content-Type, unless marked raw);
 *     that rare case calls the Python ``broker.codecs.lazy._strips_prefix(headers)``;
 *   - ``decoded``, ``error``, ``content_type`` and ``schema_id`` never decode anything.
 *
 * It also holds ``check_avro``, the C run of the integer check that broker/codecs/_avrocheck.py
 * compiles each Avro schema for (the same walk in Python is there too): a pass over the
 * body's bytes that builds no Python object; and ``encode_otlp_spans``, the OTLP/protobuf
 * encoding of finished spans that broker/telemetry/_otlp.py otherwise does in Python (a
 * span with events or with other than plain attribute values is handed back to it); and
 * ``start_timing``/``end_timing``, broker/telemetry/tracing.py's Timing (a sampled span's
 * ids and start time while it runs) and the common end of one, without a Python frame; and
 * its ``inject``, which writes the current span's ``traceparent`` into a message's headers.
 *
 * The Python module objects used here (DecodeError, CONTENT_TYPE, stored_schema_id,
 * _strips_prefix) are looked up once and kept in module globals: single-phase init, no
 * sub-interpreter support (the broker runs in the main interpreter).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <limits.h>
#include <time.h>

#define WIRE_PREFIX_LEN 5

static PyObject *DecodeError;      /* broker.codecs.base.DecodeError */
static PyObject *CONTENT_TYPE;     /* broker.envelope.CONTENT_TYPE */
static PyObject *stored_schema_id; /* broker.envelope.stored_schema_id */
static PyObject *strips_prefix;    /* broker.codecs.lazy._strips_prefix, on first use */
static PyObject *str_decode, *str_get, *str_subject, *str_sequence;

/* --- LazyValue ------------------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    PyObject *payload;
    PyObject *codec;
    PyObject *value;   /* NULL until decoded */
    PyObject *failure; /* the cached DecodeError, NULL unless decoding failed */
} LazyValueObject;

typedef struct {
    LazyValueObject base;
    PyObject *headers;
    PyObject *subject;
    PyObject *sequence;
} DecodedMessageObject;

static PyTypeObject LazyValue_Type;
static PyTypeObject DecodedMessage_Type;

static int
lazy_traverse(LazyValueObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->payload);
    Py_VISIT(self->codec);
    Py_VISIT(self->value);
    Py_VISIT(self->failure);
    return 0;
}

static int
lazy_clear(LazyValueObject *self)
{
    Py_CLEAR(self->payload);
    Py_CLEAR(self->codec);
    Py_CLEAR(self->value);
    Py_CLEAR(self->failure);
    return 0;
}

static void
lazy_dealloc(LazyValueObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    lazy_clear(self);
    type->tp_free((PyObject *)self);
}

/* Raise the cached failure again, without the traceback of its first raise. */
static PyObject *
raise_failure(PyObject *failure)
{
    if (PyException_SetTraceback(failure, Py_None) < 0) {
        return NULL;
    }
    PyErr_SetObject((PyObject *)Py_TYPE(failure), failure);
    return NULL;
}

/* ``codec.decode(body)``; caches the value, or the DecodeError (and lets it propagate). */
static PyObject *
decode_and_cache(LazyValueObject *self, PyObject *body)
{
    /* A reference of our own: the decode may run code that rebinds ``self.codec``. */
    PyObject *codec = Py_NewRef(self->codec);
    PyObject *args[2] = {codec, body};
    PyObject *value = PyObject_VectorcallMethod(
        str_decode, args, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_DECREF(codec);
    if (value != NULL) {
        Py_XSETREF(self->value, Py_NewRef(value));
        return value;
    }
    if (PyErr_ExceptionMatches(DecodeError)) {
#if PY_VERSION_HEX >= 0x030C0000
        PyObject *exc = PyErr_GetRaisedException();
        Py_XSETREF(self->failure, Py_NewRef(exc));
        PyErr_SetRaisedException(exc);
#else
        PyObject *type, *exc, *tb;
        PyErr_Fetch(&type, &exc, &tb);
        PyErr_NormalizeException(&type, &exc, &tb);
        if (tb != NULL) {
            PyException_SetTraceback(exc, tb);
        }
        Py_XSETREF(self->failure, Py_NewRef(exc));
        PyErr_Restore(type, exc, tb);
#endif
    }
    return NULL;
}

static int
check_attribute(LazyValueObject *self, PyObject *attribute, const char *name)
{
    if (attribute == NULL) {
        PyErr_Format(PyExc_AttributeError, "'%.100s' object has no attribute '%s'",
                     Py_TYPE(self)->tp_name, name);
        return -1;
    }
    return 0;
}

static PyObject *
lazy_value(LazyValueObject *self, void *closure)
{
    if (self->value != NULL) {
        return Py_NewRef(self->value);
    }
    if (self->failure != NULL) {
        return raise_failure(self->failure);
    }
    if (check_attribute(self, self->codec, "codec") < 0 ||
        check_attribute(self, self->payload, "payload") < 0) {
        return NULL;
    }
    PyObject *body = Py_NewRef(self->payload);
    PyObject *value = decode_and_cache(self, body);
    Py_DECREF(body);
    return value;
}

static PyObject *
lazy_decoded(LazyValueObject *self, void *closure)
{
    return PyBool_FromLong(self->value != NULL || self->failure != NULL);
}

static PyObject *
lazy_error(LazyValueObject *self, void *closure)
{
    return Py_NewRef(self->failure != NULL ? self->failure : Py_None);
}

/* Store the arguments and forget any earlier value (calling __init__ again resets it). */
static void
lazy_set(LazyValueObject *self, PyObject *payload, PyObject *codec)
{
    Py_XSETREF(self->payload, Py_NewRef(payload));
    Py_XSETREF(self->codec, Py_NewRef(codec));
    Py_CLEAR(self->value);
    Py_CLEAR(self->failure);
}

static int
lazy_init(LazyValueObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"payload", "codec", NULL};
    PyObject *payload, *codec;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO:LazyValue", kwlist, &payload, &codec)) {
        return -1;
    }
    lazy_set(self, payload, codec);
    return 0;
}

/* Any call ``type(*args, **kwargs)`` the fast paths do not take: tp_new, then tp_init. */
static PyObject *
generic_call(PyObject *type, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *tuple = PyTuple_New(nargs);
    if (tuple == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) {
        PyTuple_SET_ITEM(tuple, i, Py_NewRef(args[i]));
    }
    PyObject *kwargs = NULL;
    if (kwnames != NULL && PyTuple_GET_SIZE(kwnames) > 0) {
        kwargs = PyDict_New();
        if (kwargs == NULL) {
            Py_DECREF(tuple);
            return NULL;
        }
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(kwnames); i++) {
            if (PyDict_SetItem(kwargs, PyTuple_GET_ITEM(kwnames, i), args[nargs + i]) < 0) {
                Py_DECREF(tuple);
                Py_DECREF(kwargs);
                return NULL;
            }
        }
    }
    PyObject *result = PyType_Type.tp_call(type, tuple, kwargs);
    Py_DECREF(tuple);
    Py_XDECREF(kwargs);
    return result;
}

/* ``LazyValue(payload, codec)``: the exact type, called positionally, skips tp_new/tp_init. */
static PyObject *
lazy_vectorcall(PyObject *type, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (type != (PyObject *)&LazyValue_Type || PyVectorcall_NARGS(nargsf) != 2 ||
        (kwnames != NULL && PyTuple_GET_SIZE(kwnames) > 0)) {
        return generic_call(type, args, nargsf, kwnames);
    }
    LazyValueObject *self = PyObject_GC_New(LazyValueObject, &LazyValue_Type);
    if (self == NULL) {
        return NULL;
    }
    self->payload = Py_NewRef(args[0]);
    self->codec = Py_NewRef(args[1]);
    self->value = NULL;
    self->failure = NULL;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static PyMemberDef lazy_members[] = {
    {"payload", T_OBJECT_EX, offsetof(LazyValueObject, payload), 0, "The stored body."},
    {"codec", T_OBJECT_EX, offsetof(LazyValueObject, codec), 0, "The codec that reads it."},
    {NULL},
};

static PyGetSetDef lazy_getset[] = {
    {"value", (getter)lazy_value, NULL,
     "The decoded body; raises the (cached) DecodeError if it does not decode.", NULL},
    {"decoded", (getter)lazy_decoded, NULL,
     "Whether ``.value`` has been computed (or failed) already.", NULL},
    {"error", (getter)lazy_error, NULL,
     "The decode error, once ``.value`` has failed; ``None`` otherwise.", NULL},
    {NULL},
};

static PyTypeObject LazyValue_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "broker.codecs.lazy.LazyValue",
    .tp_doc = PyDoc_STR(
        "A body and the codec that reads it; ``.value`` decodes once, on first access."),
    .tp_basicsize = sizeof(LazyValueObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)lazy_init,
    .tp_vectorcall = lazy_vectorcall,
    .tp_dealloc = (destructor)lazy_dealloc,
    .tp_traverse = (traverseproc)lazy_traverse,
    .tp_clear = (inquiry)lazy_clear,
    .tp_members = lazy_members,
    .tp_getset = lazy_getset,
};

/* --- DecodedMessage ------------------------------------------------------------------- */

static int
message_traverse(DecodedMessageObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->headers);
    Py_VISIT(self->subject);
    Py_VISIT(self->sequence);
    return lazy_traverse(&self->base, visit, arg);
}

static int
message_clear(DecodedMessageObject *self)
{
    Py_CLEAR(self->headers);
    Py_CLEAR(self->subject);
    Py_CLEAR(self->sequence);
    return lazy_clear(&self->base);
}

static void
message_dealloc(DecodedMessageObject *self)
{
    PyTypeObject *type = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    message_clear(self);
    type->tp_free((PyObject *)self);
}

/* ``headers.get(CONTENT_TYPE)`` */
static PyObject *
message_content_type(DecodedMessageObject *self, void *closure)
{
    if (check_attribute(&self->base, self->headers, "headers") < 0) {
        return NULL;
    }
    PyObject *headers = Py_NewRef(self->headers);
    PyObject *args[2] = {headers, CONTENT_TYPE};
    PyObject *content_type =
        PyObject_VectorcallMethod(str_get, args, 2 | PY_VECTORCALL_ARGUMENTS_OFFSET, NULL);
    Py_DECREF(headers);
    return content_type;
}

/* Whether ``body`` is zero-led and long enough to carry the wire prefix:
 * ``body < b"\x01" and len(body) >= 5`` in Python (bytes: a byte test). */
static int
may_be_framed(PyObject *body)
{
    if (PyBytes_CheckExact(body)) {
        return PyBytes_GET_SIZE(body) >= WIRE_PREFIX_LEN && PyBytes_AS_STRING(body)[0] == 0;
    }
    PyObject *zero_led = PyBytes_FromStringAndSize("\x01", 1);
    if (zero_led == NULL) {
        return -1;
    }
    int below = PyObject_RichCompareBool(body, zero_led, Py_LT);
    Py_DECREF(zero_led);
    if (below <= 0) {
        return below;
    }
    Py_ssize_t size = PyObject_Length(body);
    return size < 0 ? -1 : size >= WIRE_PREFIX_LEN;
}

/* ``_strips_prefix(headers)``: the rare case of a zero-led body, in Python. */
static int
body_is_framed(DecodedMessageObject *self)
{
    if (strips_prefix == NULL) {
        PyObject *module = PyImport_ImportModule("broker.codecs.lazy");
        if (module == NULL) {
            return -1;
        }
        strips_prefix = PyObject_GetAttrString(module, "_strips_prefix");
        Py_DECREF(module);
        if (strips_prefix == NULL) {
            return -1;
        }
    }
    PyObject *headers = Py_NewRef(self->headers);
    PyObject *result = PyObject_CallOneArg(strips_prefix, headers);
    Py_DECREF(headers);
    if (result == NULL) {
        return -1;
    }
    int is_framed = PyObject_IsTrue(result);
    Py_DECREF(result);
    return is_framed;
}

static PyObject *
message_value(DecodedMessageObject *self, void *closure)
{
    LazyValueObject *base = &self->base;
    if (base->value != NULL) {
        return Py_NewRef(base->value);
    }
    if (base->failure != NULL) {
        return raise_failure(base->failure);
    }
    if (check_attribute(base, base->payload, "payload") < 0) {
        return NULL;
    }
    PyObject *body = Py_NewRef(base->payload);
    int strip = may_be_framed(body);
    if (strip > 0) {
        if (check_attribute(base, self->headers, "headers") < 0) {
            Py_DECREF(body);
            return NULL;
        }
        strip = body_is_framed(self);
    }
    if (strip < 0) {
        Py_DECREF(body);
        return NULL;
    }
    if (strip) {
        PyObject *rest = PyBytes_CheckExact(body)
            ? PyBytes_FromStringAndSize(PyBytes_AS_STRING(body) + WIRE_PREFIX_LEN,
                                        PyBytes_GET_SIZE(body) - WIRE_PREFIX_LEN)
            : PySequence_GetSlice(body, WIRE_PREFIX_LEN, PY_SSIZE_T_MAX);
        Py_SETREF(body, rest);
        if (body == NULL) {
            return NULL;
        }
    }
    if (check_attribute(base, base->codec, "codec") < 0) {
        Py_DECREF(body);
        return NULL;
    }
    PyObject *value = decode_and_cache(base, body);
    Py_DECREF(body);
    return value;
}

static PyObject *
message_schema_id(DecodedMessageObject *self, void *closure)
{
    if (check_attribute(&self->base, self->headers, "headers") < 0) {
        return NULL;
    }
    PyObject *headers = Py_NewRef(self->headers);
    PyObject *schema_id = PyObject_CallOneArg(stored_schema_id, headers);
    Py_DECREF(headers);
    return schema_id;
}

static void
message_set(DecodedMessageObject *self, PyObject *payload, PyObject *headers, PyObject *codec,
            PyObject *subject, PyObject *sequence)
{
    lazy_set(&self->base, payload, codec);
    Py_XSETREF(self->headers, Py_NewRef(headers));
    Py_XSETREF(self->subject, Py_NewRef(subject));
    Py_XSETREF(self->sequence, Py_NewRef(sequence));
}

static int
message_init(DecodedMessageObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"payload", "headers", "codec", "subject", "sequence", NULL};
    PyObject *payload, *headers, *codec, *subject = Py_None, *sequence = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|$OO:DecodedMessage", kwlist, &payload,
                                     &headers, &codec, &subject, &sequence)) {
        return -1;
    }
    message_set(self, payload, headers, codec, subject, sequence);
    return 0;
}

static int
name_is(PyObject *name, PyObject *interned)
{
    return name == interned || PyUnicode_Compare(name, interned) == 0;
}

/* ``DecodedMessage(payload, headers, codec, subject=..., sequence=...)`` on the exact type:
 * no argument tuple, no tp_new/tp_init; anything unusual goes the generic way. */
static PyObject *
message_vectorcall(PyObject *type, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (type != (PyObject *)&DecodedMessage_Type || PyVectorcall_NARGS(nargsf) != 3) {
        return generic_call(type, args, nargsf, kwnames);
    }
    PyObject *subject = Py_None, *sequence = Py_None;
    if (kwnames != NULL) {
        Py_ssize_t count = PyTuple_GET_SIZE(kwnames);
        int seen_subject = 0, seen_sequence = 0;
        for (Py_ssize_t i = 0; i < count; i++) {
            PyObject *name = PyTuple_GET_ITEM(kwnames, i);
            if (!seen_subject && name_is(name, str_subject)) {
                subject = args[3 + i];
                seen_subject = 1;
            }
            else if (!seen_sequence && name_is(name, str_sequence)) {
                sequence = args[3 + i];
                seen_sequence = 1;
            }
            else {
                return generic_call(type, args, nargsf, kwnames);
            }
        }
    }
    DecodedMessageObject *self = PyObject_GC_New(DecodedMessageObject, &DecodedMessage_Type);
    if (self == NULL) {
        return NULL;
    }
    self->base.payload = Py_NewRef(args[0]);
    self->base.codec = Py_NewRef(args[2]);
    self->base.value = NULL;
    self->base.failure = NULL;
    self->headers = Py_NewRef(args[1]);
    self->subject = Py_NewRef(subject);
    self->sequence = Py_NewRef(sequence);
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static PyMemberDef message_members[] = {
    {"headers", T_OBJECT_EX, offsetof(DecodedMessageObject, headers), 0, "The stored headers."},
    {"subject", T_OBJECT_EX, offsetof(DecodedMessageObject, subject), 0,
     "The stored subject, if the reader passed it."},
    {"sequence", T_OBJECT_EX, offsetof(DecodedMessageObject, sequence), 0,
     "The stream sequence, if the reader passed it."},
    {NULL},
};

static PyGetSetDef message_getset[] = {
    {"value", (getter)message_value, NULL,
     "The decoded body (without a Confluent prefix, by the rule publishing applied).", NULL},
    {"content_type", (getter)message_content_type, NULL, "The stored ``Content-Type``.", NULL},
    {"schema_id", (getter)message_schema_id, NULL,
     "The stored ``Broker-Schema-Id`` (from a header or the wire prefix at publish).", NULL},
    {NULL},
};

static PyTypeObject DecodedMessage_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "broker.codecs.lazy.DecodedMessage",
    .tp_doc = PyDoc_STR(
        "A stored message as a reader sees it: position and headers now, value when asked."),
    .tp_basicsize = sizeof(DecodedMessageObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_base = &LazyValue_Type,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)message_init,
    .tp_vectorcall = message_vectorcall,
    .tp_dealloc = (destructor)message_dealloc,
    .tp_traverse = (traverseproc)message_traverse,
    .tp_clear = (inquiry)message_clear,
    .tp_members = message_members,
    .tp_getset = message_getset,
};

/* --- module --------------------------------------------------------------------------- */

static PyObject *
import_attribute(const char *module_name, const char *name)
{
    PyObject *module = PyImport_ImportModule(module_name);
    if (module == NULL) {
        return NULL;
    }
    PyObject *attribute = PyObject_GetAttrString(module, name);
    Py_DECREF(module);
    return attribute;
}


/* --- check_avro: Avro's integers held to the spec (see broker/codecs/_avrocheck.py) ---- */

enum { OP_NULL, OP_BOOLEAN, OP_INT, OP_LONG, OP_FLOAT, OP_DOUBLE, OP_BYTES, OP_FIXED,
       OP_ENUM, OP_RECORD, OP_ARRAY, OP_MAP, OP_UNION };

typedef struct {
    const unsigned char *code; /* the program after its root word (any alignment) */
    Py_ssize_t words;
    const unsigned char *start, *pos, *end;
    int max_depth;
    const char *reason; /* set with offset when the walk stops */
    Py_ssize_t offset;
} Walk;

static int
walk_fail(Walk *w, const unsigned char *at, const char *reason)
{
    w->reason = reason;
    w->offset = at - w->start;
    return -1;
}

/* A word of the program, bounds-checked: the program comes from Python code. */
static int
word(Walk *w, Py_ssize_t at, int32_t *out)
{
    if (at < 0 || at >= w->words) {
        w->reason = "the program is malformed";
        w->offset = 0;
        return -1;
    }
    memcpy(out, w->code + at * (Py_ssize_t)sizeof(int32_t), sizeof(int32_t));
    return 0;
}

/* A zigzag varint: an int in at most 5 bytes and 32 bits, anything else in 10 and 64. */
static int
varint(Walk *w, int is_int, int64_t *out)
{
    const unsigned char *first = w->pos;
    uint64_t n = 0;
    int shift = 0;
    for (;;) {
        if (w->pos >= w->end) {
            return walk_fail(w, first, "the body ends inside a value");
        }
        unsigned char byte = *w->pos++;
        if (w->pos - first == (is_int ? 5 : 10)) { /* the last byte there may be */
            if (byte & 0x80) {
                return walk_fail(w, first, is_int ? "an int takes more than 5 bytes"
                                                  : "a long takes more than 10 bytes");
            }
            if (!is_int && (byte & 0x7E)) {
                return walk_fail(w, first, "a long is outside the 64-bit range");
            }
        }
        n |= (uint64_t)(byte & 0x7F) << shift;
        if (!(byte & 0x80)) {
            break;
        }
        shift += 7;
    }
    if (is_int && n > 0xFFFFFFFFu) {
        return walk_fail(w, first, "an int is outside the 32-bit range");
    }
    *out = (int64_t)(n >> 1) ^ -(int64_t)(n & 1);
    return 0;
}

static int
advance(Walk *w, int64_t count)
{
    if (count < 0 || count > w->end - w->pos) {
        return walk_fail(w, w->pos, "the body ends inside a value");
    }
    w->pos += count;
    return 0;
}

static int walk_node(Walk *w, int32_t at, int depth);

static int
walk_blocks(Walk *w, int32_t at, int is_map, int depth)
{
    int32_t item, empty;
    if (word(w, (Py_ssize_t)at + 1, &item) < 0 || word(w, (Py_ssize_t)at + 2, &empty) < 0) {
        return -1;
    }
    for (;;) {
        int64_t count, size;
        if (varint(w, 0, &count) < 0) {
            return -1;
        }
        if (count == 0) {
            return 0;
        }
        if (count < 0) {
            if (varint(w, 0, &size) < 0) { /* the block's size in bytes */
                return -1;
            }
        }
        if (empty) {
            continue;
        }
        /* |count| as unsigned (INT64_MIN has no positive twin); every item takes a byte
         * at least, so the loop ends at the body's end whatever the count says. */
        uint64_t items = count < 0 ? (uint64_t)0 - (uint64_t)count : (uint64_t)count;
        for (uint64_t i = 0; i < items; i++) {
            int rc;
            if (is_map) {
                int64_t length;
                if (varint(w, 0, &length) < 0 || advance(w, length) < 0) {
                    return -1;
                }
            }
            if ((rc = walk_node(w, item, depth)) < 0) {
                return rc;
            }
        }
    }
}

static int
walk_node(Walk *w, int32_t at, int depth)
{
    int32_t op, n, child;
    int64_t value;
    const unsigned char *here = w->pos;
    if (word(w, at, &op) < 0) {
        return -1;
    }
    switch (op) {
    case OP_NULL:
        return 0;
    case OP_BOOLEAN:
        return advance(w, 1);
    case OP_FLOAT:
        return advance(w, 4);
    case OP_DOUBLE:
        return advance(w, 8);
    case OP_INT:
        return varint(w, 1, &value);
    case OP_LONG:
        return varint(w, 0, &value);
    case OP_BYTES:
        if (varint(w, 0, &value) < 0) {
            return -1;
        }
        return advance(w, value);
    case OP_FIXED:
        if (word(w, (Py_ssize_t)at + 1, &n) < 0) {
            return -1;
        }
        return advance(w, n);
    case OP_ENUM:
        if (word(w, (Py_ssize_t)at + 1, &n) < 0 || varint(w, 1, &value) < 0) {
            return -1;
        }
        if (value < 0 || value >= n) {
            return walk_fail(w, here, "an enum index is out of range");
        }
        return 0;
    case OP_UNION:
        if (word(w, (Py_ssize_t)at + 1, &n) < 0 || varint(w, 0, &value) < 0) {
            return -1;
        }
        if (value < 0 || value >= n) {
            return walk_fail(w, here, "a union branch is out of range");
        }
        if (word(w, (Py_ssize_t)at + 2 + value, &child) < 0 || word(w, child, &n) < 0) {
            return -1;
        }
        if (n == OP_UNION) { /* a union in a union (fastavro reads them): a level deeper */
            if (depth >= w->max_depth) {
                w->reason = NULL;
                w->offset = here - w->start;
                return -2;
            }
            return walk_node(w, child, depth + 1);
        }
        return walk_node(w, child, depth);
    case OP_RECORD:
    case OP_ARRAY:
    case OP_MAP:
        if (depth >= w->max_depth) {
            w->reason = NULL; /* the message names the limit: built by the caller */
            w->offset = here - w->start;
            return -2;
        }
        if (op != OP_RECORD) {
            return walk_blocks(w, at, op == OP_MAP, depth + 1);
        }
        if (word(w, (Py_ssize_t)at + 1, &n) < 0) {
            return -1;
        }
        for (int32_t i = 0; i < n; i++) {
            int rc;
            if (word(w, (Py_ssize_t)at + 2 + i, &child) < 0) {
                return -1;
            }
            if ((rc = walk_node(w, child, depth + 1)) < 0) {
                return rc;
            }
        }
        return 0;
    default:
        w->reason = "the program is malformed";
        w->offset = 0;
        return -1;
    }
}

static PyObject *
check_avro(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "check_avro(program, payload, max_depth)");
        return NULL;
    }
    long depth_arg = PyLong_AsLong(args[2]);
    if (depth_arg == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (depth_arg < 0 || depth_arg > 10000) {
        PyErr_SetString(PyExc_ValueError, "max_depth must be between 0 and 10000");
        return NULL;
    }
    int max_depth = (int)depth_arg;
    Py_buffer program, payload;
    if (PyObject_GetBuffer(args[0], &program, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    if (PyObject_GetBuffer(args[1], &payload, PyBUF_SIMPLE) < 0) {
        PyBuffer_Release(&program);
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t words = program.len / (Py_ssize_t)sizeof(int32_t);
    if (words < 1 || program.len % (Py_ssize_t)sizeof(int32_t)) {
        PyErr_SetString(PyExc_ValueError, "the program is not a whole number of 32-bit words");
        goto done;
    }
    const unsigned char *code = (const unsigned char *)program.buf;
    int32_t root;
    memcpy(&root, code, sizeof root);
    Walk w = {
        .code = code + sizeof(int32_t),
        .words = words - 1,
        .start = (const unsigned char *)payload.buf,
        .pos = (const unsigned char *)payload.buf,
        .end = (const unsigned char *)payload.buf + payload.len,
        .max_depth = max_depth,
        .reason = NULL,
        .offset = 0,
    };
    int rc = walk_node(&w, root, 0);
    if (rc == 0) {
        result = Py_NewRef(Py_None);
    }
    else if (rc == -2) {
        result = Py_BuildValue("(nN)", w.offset,
                               PyUnicode_FromFormat("nested deeper than %d levels", max_depth));
    }
    else {
        result = Py_BuildValue("(ns)", w.offset, w.reason);
    }
done:
    PyBuffer_Release(&payload);
    PyBuffer_Release(&program);
    return result;
}


/* --- encode_otlp_spans: OTLP/protobuf of finished spans (see broker/telemetry/_otlp.py) --- */

/* The encoded batch, written straight into the bytes object it is returned as (no copy at
 * the end): data points into bytes, cap is its size, len what is written so far. */
typedef struct {
    PyObject *bytes;
    char *data;
    Py_ssize_t len, cap;
} Buf;

#if defined(__GNUC__) || defined(__clang__)
#define LAZY_NOINLINE __attribute__((noinline))
#else
#define LAZY_NOINLINE
#endif

/* Room for more bytes: the bytes object grown to at least twice its size (rare: a batch
 * starts at the size its spans took last time). */
static LAZY_NOINLINE int
buf_grow(Buf *b, Py_ssize_t more)
{
    Py_ssize_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + more) {
        if (cap > PY_SSIZE_T_MAX / 2) {
            PyErr_NoMemory();
            return -1;
        }
        cap *= 2;
    }
    if (b->bytes == NULL) {
        b->bytes = PyBytes_FromStringAndSize(NULL, cap);
        if (b->bytes == NULL) {
            return -1;
        }
    }
    else if (_PyBytes_Resize(&b->bytes, cap) < 0) { /* frees it and sets NULL on failure */
        b->data = NULL;
        b->len = b->cap = 0;
        return -1;
    }
    b->data = PyBytes_AS_STRING(b->bytes);
    b->cap = cap;
    return 0;
}

static inline int
buf_reserve(Buf *b, Py_ssize_t more)
{
    return b->len + more <= b->cap ? 0 : buf_grow(b, more);
}

/* Inlined, so that a copy of a few bytes of known size is a move or two, not a call. */
static inline Py_ALWAYS_INLINE int
buf_put(Buf *b, const void *bytes, Py_ssize_t n)
{
    if (buf_reserve(b, n) < 0) {
        return -1;
    }
    memcpy(b->data + b->len, bytes, (size_t)n);
    b->len += n;
    return 0;
}

static inline int
buf_byte(Buf *b, unsigned char byte)
{
    return buf_put(b, &byte, 1);
}

static int
varint_size(uint64_t n)
{
    int size = 1;
    while (n > 127) {
        n >>= 7;
        size++;
    }
    return size;
}

/* ``n`` as a protobuf varint into ``out`` (room for 10 bytes); its length. */
static int
put_varint(unsigned char *out, uint64_t n)
{
    int i = 0;
    while (n > 127) {
        out[i++] = (unsigned char)((n & 0x7F) | 0x80);
        n >>= 7;
    }
    out[i++] = (unsigned char)n;
    return i;
}

static inline int
buf_varint(Buf *b, uint64_t n)
{
    if (buf_reserve(b, 10) < 0) {
        return -1;
    }
    b->len += put_varint((unsigned char *)b->data + b->len, n);
    return 0;
}

static inline int
buf_fixed64(Buf *b, uint64_t n)
{
    unsigned char out[8];
    for (int i = 0; i < 8; i++) {
        out[i] = (unsigned char)(n >> (8 * i));
    }
    return buf_put(b, out, 8);
}

static inline int
buf_be64(Buf *b, uint64_t n)
{
    unsigned char out[8];
    for (int i = 0; i < 8; i++) {
        out[i] = (unsigned char)(n >> (56 - 8 * i));
    }
    return buf_put(b, out, 8);
}

/* tag, length, bytes */
static inline int
buf_field(Buf *b, unsigned char tag, const char *bytes, Py_ssize_t n)
{
    if (buf_byte(b, tag) < 0 || buf_varint(b, (uint64_t)n) < 0) {
        return -1;
    }
    return buf_put(b, bytes, n);
}

static PyObject *sixty_four;     /* the int 64, for a trace id's high half */
static PyObject *two_to_the_64; /* the int 2**64, the bound of an unsigned 64-bit value */

/* An unsigned 64-bit value of an int, or -1 with an exception set (not an int, negative,
 * or too large): the span then goes to the Python encoder, which raises as it always has.
 * Through PyLong_AsLongLongAndOverflow, which reads the int's digits directly: on Python 3.11
 * PyLong_AsUnsignedLongLong goes byte by byte (_PyLong_AsByteArray), about 800 instructions
 * of the export thread's work per span. */
static int
as_u64(PyObject *value, uint64_t *out)
{
    if (!PyLong_CheckExact(value)) { /* a subclass may override what Python would call */
        PyErr_SetString(PyExc_TypeError, "not an int");
        return -1;
    }
    int overflow;
    long long n = PyLong_AsLongLongAndOverflow(value, &overflow);
    if (overflow == 0) {
        if (n == -1 && PyErr_Occurred()) {
            return -1;
        }
        if (n < 0) {
            PyErr_SetString(PyExc_OverflowError, "a negative int");
            return -1;
        }
        *out = (uint64_t)n;
        return 0;
    }
    /* 2**63 and above (half of all span ids): the low 64 bits, once below 2**64 */
    int below = overflow > 0 ? PyObject_RichCompareBool(value, two_to_the_64, Py_LT) : 0;
    if (below <= 0) {
        if (below == 0) {
            PyErr_SetString(PyExc_OverflowError, "an int out of 0..2**64-1");
        }
        return -1;
    }
    *out = (uint64_t)PyLong_AsUnsignedLongLongMask(value);
    return 0;
}

static int
trace_id(Buf *b, PyObject *value)
{
    uint64_t low, high;
    if (!PyLong_CheckExact(value)) {
        PyErr_SetString(PyExc_TypeError, "not an int");
        return -1;
    }
    low = (uint64_t)PyLong_AsUnsignedLongLongMask(value);
    if (low == (uint64_t)-1 && PyErr_Occurred()) {
        return -1;
    }
    PyObject *top = PyNumber_Rshift(value, sixty_four);
    if (top == NULL) {
        return -1;
    }
    int rc = as_u64(top, &high);
    Py_DECREF(top);
    if (rc < 0 || buf_be64(b, high) < 0) {
        return -1;
    }
    return buf_be64(b, low);
}

static int
utf8(PyObject *value, const char **bytes, Py_ssize_t *n)
{
    if (!PyUnicode_CheckExact(value)) {
        PyErr_SetString(PyExc_TypeError, "not a str");
        return -1;
    }
    *bytes = PyUnicode_AsUTF8AndSize(value, n);
    return *bytes == NULL ? -1 : 0;
}

/* One attribute as Span.attributes (a KeyValue), for plain values only; -1 otherwise. */
static int
key_value(Buf *b, PyObject *key, PyObject *value)
{
    const char *k, *v = NULL;
    Py_ssize_t kn, vn = 0;
    unsigned char scalar[16]; /* a tag and a varint of up to 10 bytes, or a double */
    int scalar_n = 0;
    unsigned char tag = 0;
    if (utf8(key, &k, &kn) < 0) {
        return -1;
    }
    /* Exact types only (and bool): the Python encoder calls methods a subclass may
     * override (encode, &, len), so a subclass's value is left to it. */
    if (PyUnicode_CheckExact(value)) {
        tag = 0x0a; /* AnyValue.string_value */
        if (utf8(value, &v, &vn) < 0) {
            return -1;
        }
    }
    else if (PyBool_Check(value)) {
        scalar[0] = 0x10;
        scalar[1] = value == Py_True;
        scalar_n = 2;
    }
    else if (PyLong_CheckExact(value)) {
        uint64_t n = (uint64_t)PyLong_AsUnsignedLongLongMask(value); /* int64: two's complement */
        if (n == (uint64_t)-1 && PyErr_Occurred()) {
            return -1;
        }
        scalar[0] = 0x18;
        scalar_n = 1 + put_varint(scalar + 1, n);
    }
    else if (PyFloat_CheckExact(value)) {
        double d = PyFloat_AS_DOUBLE(value);
        uint64_t bits;
        memcpy(&bits, &d, 8);
        scalar[0] = 0x21;
        for (int i = 0; i < 8; i++) {
            scalar[1 + i] = (unsigned char)(bits >> (8 * i));
        }
        scalar_n = 9;
    }
    else if (PyBytes_CheckExact(value)) {
        tag = 0x3a; /* AnyValue.bytes_value */
        v = PyBytes_AS_STRING(value);
        vn = PyBytes_GET_SIZE(value);
    }
    else {
        PyErr_SetString(PyExc_TypeError, "not a plain attribute value");
        return -1;
    }
    uint64_t any = scalar_n ? (uint64_t)scalar_n : 1 + varint_size((uint64_t)vn) + (uint64_t)vn;
    uint64_t body = 1 + varint_size((uint64_t)kn) + (uint64_t)kn + 1 + varint_size(any) + any;
    if (buf_byte(b, 0x4a) < 0 || buf_varint(b, body) < 0 || buf_field(b, 0x0a, k, kn) < 0 ||
        buf_byte(b, 0x12) < 0 || buf_varint(b, any) < 0) {
        return -1;
    }
    if (scalar_n) {
        return buf_put(b, scalar, scalar_n);
    }
    return buf_field(b, tag, v, vn);
}

#define SPAN_HEAD 13 /* fields before the attributes: broker/telemetry/_spans.py */

/* The Span message of one finished span into ``b``; -1 (an exception set) for a span the
 * C encoder leaves to Python: events, values other than plain ones, out-of-range numbers. */
static int
span_body(Buf *b, PyObject *span)
{
    if (!PyTuple_CheckExact(span) || PyTuple_GET_SIZE(span) < SPAN_HEAD ||
        (PyTuple_GET_SIZE(span) - SPAN_HEAD) % 2) {
        PyErr_SetString(PyExc_TypeError, "not a finished span");
        return -1;
    }
    PyObject **f = &PyTuple_GET_ITEM(span, 0);
    /* name, trace_id, span_id, parent_id, remote, tracestate, kind, start, end, dropped,
     * events, status, description */
    uint64_t id, parent, start, end, dropped, kind, status;
    const char *text;
    Py_ssize_t n;
    if (f[10] != Py_None) {
        PyErr_SetString(PyExc_TypeError, "a span with events");
        return -1;
    }
    if (buf_put(b, "\x0a\x10", 2) < 0 || trace_id(b, f[1]) < 0) {
        return -1;
    }
    if (as_u64(f[2], &id) < 0 || buf_put(b, "\x12\x08", 2) < 0 || buf_be64(b, id) < 0) {
        return -1;
    }
    /* Truth values only of None, str and bool, whose truth runs no Python code. */
    if (f[5] != Py_None) { /* a tracestate: written when not empty */
        if (utf8(f[5], &text, &n) < 0 || (n && buf_field(b, 0x1a, text, n) < 0)) {
            return -1;
        }
    }
    if (as_u64(f[3], &parent) < 0) {
        return -1;
    }
    if (parent && (buf_put(b, "\x22\x08", 2) < 0 || buf_be64(b, parent) < 0)) {
        return -1;
    }
    if (utf8(f[0], &text, &n) < 0 || buf_field(b, 0x2a, text, n) < 0) {
        return -1;
    }
    if (as_u64(f[6], &kind) < 0 || as_u64(f[7], &start) < 0 || as_u64(f[8], &end) < 0 ||
        as_u64(f[9], &dropped) < 0 || as_u64(f[11], &status) < 0) {
        return -1;
    }
    if (kind > 4 || status > 127) {
        PyErr_SetString(PyExc_ValueError, "kind or status out of range");
        return -1;
    }
    if (buf_byte(b, 0x30) < 0 || buf_byte(b, (unsigned char)(kind + 1)) < 0 ||
        buf_byte(b, 0x39) < 0 || buf_fixed64(b, start) < 0 || buf_byte(b, 0x41) < 0 ||
        buf_fixed64(b, end) < 0) {
        return -1;
    }
    for (Py_ssize_t i = SPAN_HEAD; i < PyTuple_GET_SIZE(span); i += 2) {
        if (key_value(b, f[i], f[i + 1]) < 0) {
            return -1;
        }
    }
    if (dropped && (buf_byte(b, 0x50) < 0 || buf_varint(b, dropped) < 0)) {
        return -1;
    }
    if (status) {
        const char *message = NULL;
        Py_ssize_t message_n = 0;
        if (f[12] != Py_None) {
            if (utf8(f[12], &message, &message_n) < 0) {
                return -1;
            }
            if (message_n == 0) {
                message = NULL; /* an empty description is not written */
            }
        }
        uint64_t body = 2 + (message ? 1 + varint_size((uint64_t)message_n) + (uint64_t)message_n : 0);
        if (buf_byte(b, 0x7a) < 0 || buf_varint(b, body) < 0 ||
            (message && buf_field(b, 0x12, message, message_n) < 0) || buf_byte(b, 0x18) < 0 ||
            buf_byte(b, (unsigned char)status) < 0) {
            return -1;
        }
    }
    else if (buf_put(b, "\x7a\x00", 2) < 0) { /* the SDK's encoder writes an empty Status */
        return -1;
    }
    if (!PyBool_Check(f[4])) {
        PyErr_SetString(PyExc_TypeError, "parent_remote is not a bool");
        return -1;
    }
    int remote = f[4] == Py_True;
    return buf_put(b, remote ? "\x85\x01\x00\x03\x00\x00" : "\x85\x01\x00\x01\x00\x00", 6);
}

/* Bytes per span of the last batch encoded, within bounds: where the next one starts (only the
 * export thread encodes, holding the GIL). A batch starts with room for at most
 * MAX_BATCH_ROOM bytes, whatever its spans took last time, and grows past it if need be. */
static Py_ssize_t span_size_hint = 256;
#define MIN_SPAN_HINT 64
#define MAX_SPAN_HINT 4096
#define MAX_BATCH_ROOM (16 * 1024 * 1024)

static PyObject *
encode_otlp_spans(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "encode_otlp_spans(spans, fallback)");
        return NULL;
    }
    /* A tuple of its own: the items stay alive whatever the Python code called on the way
     * (a span's __bool__, the fallback) does to the caller's list. */
    PyObject *spans = PySequence_Tuple(args[0]);
    if (spans == NULL) {
        return NULL;
    }
    PyObject *fallback = args[1];
    Py_ssize_t count = PyTuple_GET_SIZE(spans);
    Buf out = {NULL, NULL, 0, 0};
    PyObject *result = NULL;
    /* Room for the batch as large as the last one's spans were, and a quarter more. */
    Py_ssize_t per_span = span_size_hint + span_size_hint / 4;
    Py_ssize_t room = count < MAX_BATCH_ROOM / per_span ? count * per_span + 64 : MAX_BATCH_ROOM;
    if (buf_grow(&out, room) < 0) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *span = PyTuple_GET_ITEM(spans, i);
        /* The field's tag, room for a length of two bytes (a span of 128 to 16383 bytes),
         * the span written after it, then its length: moved when it takes another size. */
        Py_ssize_t at = out.len;
        if (buf_reserve(&out, 3) < 0) {
            goto done;
        }
        out.data[at] = 0x12;
        out.len = at + 3;
        if (span_body(&out, span) == 0) {
            Py_ssize_t n = out.len - at - 3;
            int size = varint_size((uint64_t)n);
            if (size != 2) {
                if (size > 2 && buf_reserve(&out, size - 2) < 0) {
                    goto done;
                }
                memmove(out.data + at + 1 + size, out.data + at + 3, (size_t)n);
                out.len = at + 1 + size + n;
            }
            put_varint((unsigned char *)out.data + at + 1, (uint64_t)n);
            continue;
        }
        out.len = at; /* what was written of it goes */
        if (PyErr_ExceptionMatches(PyExc_MemoryError) || out.bytes == NULL) {
            goto done;
        }
        PyErr_Clear(); /* the Python encoder takes this one (and raises what it raises) */
        PyObject *encoded = PyObject_CallOneArg(fallback, span);
        if (encoded == NULL) {
            goto done;
        }
        if (!PyBytes_Check(encoded)) {
            Py_DECREF(encoded);
            PyErr_SetString(PyExc_TypeError, "the fallback encoder must return bytes");
            goto done;
        }
        int rc = buf_put(&out, PyBytes_AS_STRING(encoded), PyBytes_GET_SIZE(encoded));
        Py_DECREF(encoded);
        if (rc < 0) {
            goto done;
        }
    }
    if (count) {
        span_size_hint = Py_MAX(MIN_SPAN_HINT, Py_MIN(MAX_SPAN_HINT, out.len / count));
    }
    if (_PyBytes_Resize(&out.bytes, out.len) == 0) {
        result = out.bytes;
        out.bytes = NULL;
    }
done:
    Py_XDECREF(out.bytes);
    Py_DECREF(spans);
    return result;
}

/* --- a sampled span's timing (broker.telemetry.tracing.Timing) ------------------------- */
/*
 * The ingress's server span and a publish's ``append`` span are kept as their ids and start
 * time while they run (a Timing), made current as a TraceContext in the tracing module's
 * context variable, and queued as one flat finished-span tuple when they end. This is
 * ``Timing.__init__`` and the common case of ``end_timing`` (no exception, not failed) in C:
 * the same objects, made with no Python frame. timing_bind() hands over what they use.
 */

typedef struct {
    PyObject_HEAD
    PyObject *name;
    PyObject *trace_id;
    PyObject *span_id;
    PyObject *parent_id;
    PyObject *tracestate;
    PyObject *pipeline;
    PyObject *token; /* the context variable's token; NULL for a timing not made current */
    long long start;
    int kind;
    char parent_remote;
    char ended; /* ended once: a second end is an error */
} TimingObject;

static PyObject *timing_var;          /* tracing._current, a ContextVar */
static PyTypeObject *trace_context;   /* tracing.TraceContext, a named tuple of five */
static PyObject *timing_getrandbits;  /* random.getrandbits */
static PyObject *timing_end_fallback; /* tracing._end_timing: all but the common case */
static PyObject *str_ended;
static PyObject *str_name;
static PyObject *str_error;
static PyObject *str_failed;
static PyObject *str_current;
static PyObject *str_direct;
static PyObject *str_append;
static PyObject *str_batch_ready;
static PyObject *empty_tuple;
static PyObject *str_traceparent;
static PyObject *str_tracestate;
static PyObject *int_zero;
static PyObject *int_one;

static int
timing_traverse(TimingObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->name);
    Py_VISIT(self->trace_id);
    Py_VISIT(self->span_id);
    Py_VISIT(self->parent_id);
    Py_VISIT(self->tracestate);
    Py_VISIT(self->pipeline);
    Py_VISIT(self->token);
    return 0;
}

static int
timing_clear(TimingObject *self)
{
    Py_CLEAR(self->name);
    Py_CLEAR(self->trace_id);
    Py_CLEAR(self->span_id);
    Py_CLEAR(self->parent_id);
    Py_CLEAR(self->tracestate);
    Py_CLEAR(self->pipeline);
    Py_CLEAR(self->token);
    return 0;
}

static void
timing_dealloc(TimingObject *self)
{
    PyObject_GC_UnTrack(self);
    timing_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMemberDef timing_members[] = {
    {"name", T_OBJECT, offsetof(TimingObject, name), READONLY, "The span's name."},
    {"trace_id", T_OBJECT, offsetof(TimingObject, trace_id), READONLY, "Its trace's id."},
    {"span_id", T_OBJECT, offsetof(TimingObject, span_id), READONLY, "Its own id."},
    {"parent_id", T_OBJECT, offsetof(TimingObject, parent_id), READONLY,
     "Its parent's span id; 0 for a root."},
    {"parent_remote", T_BOOL, offsetof(TimingObject, parent_remote), READONLY,
     "Whether the parent was recorded by another process."},
    {"tracestate", T_OBJECT, offsetof(TimingObject, tracestate), READONLY,
     "The parent's tracestate, or None."},
    {"pipeline", T_OBJECT, offsetof(TimingObject, pipeline), READONLY,
     "Where the span goes when it ends (None: nowhere)."},
    {"token", T_OBJECT, offsetof(TimingObject, token), READONLY,
     "The context variable's token, to make the context before it current again; None for a "
     "timing not made current."},
    {"ended", T_BOOL, offsetof(TimingObject, ended), 0,
     "Whether it has ended (the Python end_timing sets it too)."},
    {"start", T_LONGLONG, offsetof(TimingObject, start), READONLY,
     "Start time, ns since the epoch."},
    {"kind", T_INT, offsetof(TimingObject, kind), READONLY, "The span kind's value."},
    {NULL},
};

static PyTypeObject Timing_Type = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "broker.codecs._lazy.Timing",
    .tp_basicsize = sizeof(TimingObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A sampled span while it runs: ids and start time (made by start_timing).",
    .tp_traverse = (traverseproc)timing_traverse,
    .tp_clear = (inquiry)timing_clear,
    .tp_dealloc = (destructor)timing_dealloc,
    .tp_members = timing_members,
};

static int
now_ns(long long *out)
{
    struct timespec ts; /* time.time_ns() reads the same clock */
    if (clock_gettime(CLOCK_REALTIME, &ts) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    *out = (long long)ts.tv_sec * 1000000000LL + (long long)ts.tv_nsec;
    return 0;
}

static PyObject *
timing_bind(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError,
                        "timing_bind(current, TraceContext, getrandbits, end_timing)");
        return NULL;
    }
    if (!PyType_Check(args[1]) || !PyType_IsSubtype((PyTypeObject *)args[1], &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "TraceContext must be a tuple type");
        return NULL;
    }
    if (!PyCallable_Check(args[2]) || !PyCallable_Check(args[3])) {
        PyErr_SetString(PyExc_TypeError, "getrandbits and end_timing must be callable");
        return NULL;
    }
    Py_XSETREF(timing_end_fallback, Py_NewRef(args[3]));
    Py_XSETREF(timing_var, Py_NewRef(args[0]));
    Py_XSETREF(trace_context, (PyTypeObject *)Py_NewRef(args[1]));
    Py_XSETREF(timing_getrandbits, Py_NewRef(args[2]));
    Py_RETURN_NONE;
}

/* A Timing named name, of kind (a SpanKind's value), under parent (a TraceContext, or None for
 * a root), in trace trace_id, ending into pipeline; made current in the context variable unless
 * current is 0 (then only inject(headers, timing) hands its context on). */
static PyObject *
new_timing(PyObject *name, PyObject *kind_value, PyObject *parent, PyObject *trace_id,
           PyObject *pipeline, int current)
{
    if (timing_var == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "a Timing started before timing_bind");
        return NULL;
    }
    long kind = PyLong_AsLong(kind_value);
    if (kind == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (kind < INT_MIN || kind > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "span kind out of range");
        return NULL;
    }
    PyObject *parent_id = int_zero, *tracestate = Py_None;
    char remote = 0;
    if (parent != Py_None) {
        if (!PyTuple_Check(parent) || PyTuple_GET_SIZE(parent) != 5) {
            PyErr_SetString(PyExc_TypeError, "parent must be a TraceContext or None");
            return NULL;
        }
        parent_id = PyTuple_GET_ITEM(parent, 1);
        tracestate = PyTuple_GET_ITEM(parent, 3);
        remote = PyTuple_GET_ITEM(parent, 4) == Py_None;
    }
    PyObject *span_id = PyObject_CallOneArg(timing_getrandbits, sixty_four);
    if (span_id == NULL) {
        return NULL;
    }
    int zero = PyObject_Not(span_id); /* an id is never 0: 1 instead, as _new_id does */
    if (zero < 0) {
        Py_DECREF(span_id);
        return NULL;
    }
    if (zero) {
        Py_SETREF(span_id, Py_NewRef(int_one));
    }
    TimingObject *self = PyObject_GC_New(TimingObject, &Timing_Type);
    if (self == NULL) {
        Py_DECREF(span_id);
        return NULL;
    }
    self->name = Py_NewRef(name);
    self->trace_id = Py_NewRef(trace_id);
    self->span_id = span_id;
    self->parent_id = Py_NewRef(parent_id);
    self->tracestate = Py_NewRef(tracestate);
    self->pipeline = Py_NewRef(pipeline);
    self->token = NULL;
    self->start = 0;
    self->kind = (int)kind;
    self->parent_remote = remote;
    self->ended = 0;
    PyObject_GC_Track((PyObject *)self);
    if (!current) {
        if (now_ns(&self->start) < 0) {
            Py_DECREF(self);
            return NULL;
        }
        return (PyObject *)self;
    }
    /* TraceContext(trace_id, span_id, True, tracestate, self), as tuple.__new__ makes one */
    PyObject *context = trace_context->tp_alloc(trace_context, 5);
    if (context == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    PyTuple_SET_ITEM(context, 0, Py_NewRef(trace_id));
    PyTuple_SET_ITEM(context, 1, Py_NewRef(span_id));
    PyTuple_SET_ITEM(context, 2, Py_NewRef(Py_True));
    PyTuple_SET_ITEM(context, 3, Py_NewRef(tracestate));
    PyTuple_SET_ITEM(context, 4, Py_NewRef((PyObject *)self));
    self->token = PyContextVar_Set(timing_var, context);
    Py_DECREF(context);
    if (self->token == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    if (now_ns(&self->start) < 0) {
        PyObject *type, *value, *traceback;
        PyErr_Fetch(&type, &value, &traceback);
        if (PyContextVar_Reset(timing_var, self->token) < 0) {
            PyErr_Clear();
        }
        PyErr_Restore(type, value, traceback);
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

/* The ``current`` keyword of start_timing and child_timing, after ``positional`` arguments
 * (``current`` given positionally too for child_timing): 1 or 0, or -1 with an error set. */
static int
current_argument(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, Py_ssize_t positional,
                 Py_ssize_t allowed, const char *usage)
{
    Py_ssize_t keywords = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    if (nargs < positional || nargs > allowed || nargs + keywords > positional + 1 ||
        (keywords && PyUnicode_Compare(PyTuple_GET_ITEM(kwnames, 0), str_current) != 0)) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, usage);
        }
        return -1;
    }
    return nargs + keywords == positional ? 1 : PyObject_IsTrue(args[positional]);
}

static PyObject *
start_timing(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs,
             PyObject *kwnames)
{
    int current = current_argument(args, nargs, kwnames, 5, 5,
                                   "start_timing(name, kind, parent, trace_id, pipeline, *, "
                                   "current=True) takes 5 arguments and current");
    if (current < 0) {
        return NULL;
    }
    return new_timing(args[0], args[1], args[2], args[3], args[4], current);
}

static PyObject *timing_pipeline; /* the pipeline while tracing is on, else NULL */
static PyObject *str_value_;

/* The TraceContext of the span running now (a new reference) while tracing is on; NULL when
 * it is off or no span is running, and NULL with an error set when the context variable holds
 * something else. child_timing and inject start here. */
static PyObject *
current_context(void)
{
    if (timing_pipeline == NULL || timing_var == NULL) {
        return NULL;
    }
    PyObject *context;
    if (PyContextVar_Get(timing_var, Py_None, &context) < 0) {
        return NULL;
    }
    if (context == Py_None) {
        Py_DECREF(context);
        return NULL;
    }
    if (!PyTuple_Check(context) || PyTuple_GET_SIZE(context) != 5) {
        Py_DECREF(context);
        PyErr_SetString(PyExc_TypeError, "the current trace context is not a TraceContext");
        return NULL;
    }
    return context;
}

/* tracing.child_timing: a Timing child of the span running now, or None when none is (tracing
 * off, or the request is not sampled); made current itself unless current is false. */
static PyObject *
child_timing(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs,
             PyObject *kwnames)
{
    int current = current_argument(args, nargs, kwnames, 2, 3,
                                   "child_timing(name, kind, current=True) takes 2 or 3 arguments");
    if (current < 0) {
        return NULL;
    }
    PyObject *parent = current_context();
    if (parent == NULL) {
        return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
    }
    PyObject *kind = PyObject_GetAttr(args[1], str_value_); /* the SpanKind's value */
    PyObject *result = kind == NULL ? NULL
                                    : new_timing(args[0], kind, parent,
                                                 PyTuple_GET_ITEM(parent, 0), timing_pipeline,
                                                 current);
    Py_XDECREF(kind);
    Py_DECREF(parent);
    return result;
}

/* A finished span handed to its pipeline: appended to the pipeline's queue here while its
 * ``direct`` is ``(queue, max queue, max batch)`` and the queue has room (its
 * ``batch_ready()`` called once a batch waits), else to ``pipeline.ended(span)``, which also
 * takes any other sink (no ``direct``). 0, or -1 with an error set. */
static int
queue_span(PyObject *pipeline, PyObject *span)
{
    PyObject *result = NULL, *direct = PyObject_GetAttr(pipeline, str_direct);
    if (direct == NULL) { /* a sink of another kind: its ended() it is */
        if (!PyErr_ExceptionMatches(PyExc_AttributeError)) {
            return -1;
        }
        PyErr_Clear();
    }
    if (direct != NULL && PyTuple_CheckExact(direct) && PyTuple_GET_SIZE(direct) == 3) {
        PyObject *queue = PyTuple_GET_ITEM(direct, 0);
        Py_ssize_t max_queue, max_batch = -1, waiting = -1;
        if (((max_queue = PyLong_AsSsize_t(PyTuple_GET_ITEM(direct, 1))) == -1 && PyErr_Occurred()) ||
            ((max_batch = PyLong_AsSsize_t(PyTuple_GET_ITEM(direct, 2))) == -1 && PyErr_Occurred()) ||
            (waiting = PyObject_Size(queue)) < 0) {
            Py_DECREF(direct);
            return -1;
        }
        if (waiting < max_queue) {
            result = PyObject_CallMethodOneArg(queue, str_append, span);
            if (result != NULL && waiting + 1 >= max_batch) {
                Py_SETREF(result, PyObject_CallMethodNoArgs(pipeline, str_batch_ready));
            }
            Py_DECREF(direct);
            Py_XDECREF(result);
            return result == NULL ? -1 : 0;
        }
    }
    Py_XDECREF(direct); /* None, or a full queue: the pipeline's own method */
    result = PyObject_CallMethodOneArg(pipeline, str_ended, span);
    Py_XDECREF(result);
    return result == NULL ? -1 : 0;
}

#define BAD_END_TIMING "end_timing takes a tuple of attributes and a str name (or None)"

static PyObject *
end_timing(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs,
           PyObject *kwnames)
{
    /* end_timing(timing, attributes=(), *, error=None, failed=False, name=None) */
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "end_timing takes a Timing and a tuple of attributes");
        return NULL;
    }
    if (timing_end_fallback == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "end_timing before timing_bind");
        return NULL;
    }
    PyObject *attributes = nargs == 2 ? args[1] : empty_tuple, *name = Py_None;
    int fallback = !Py_IS_TYPE(args[0], &Timing_Type);
    Py_ssize_t keywords = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t i = 0; i < keywords; i++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, i), *value = args[nargs + i];
        /* A call site's keyword names are interned, so the same objects as these: compared
         * by identity first, by value only for names made at run time. */
        int is_name = key == str_name, is_error = key == str_error, is_failed = key == str_failed;
        if (!(is_name || is_error || is_failed)) {
            is_name = PyUnicode_Compare(key, str_name) == 0;
            is_error = !is_name && PyUnicode_Compare(key, str_error) == 0;
            is_failed = !is_name && !is_error && PyUnicode_Compare(key, str_failed) == 0;
        }
        if (is_name) {
            name = value;
        }
        else if (is_error) {
            fallback |= value != Py_None;
        }
        else if (is_failed) {
            int failed = PyObject_IsTrue(value);
            if (failed < 0) {
                return NULL;
            }
            fallback |= failed;
        }
        else {
            fallback = 1; /* the Python function says what is wrong with it */
        }
    }
    if (PyErr_Occurred()) { /* a keyword that is not a str, compared */
        return NULL;
    }
    if (fallback) { /* a failed span or a Python Timing: the Python function */
        return PyObject_Vectorcall(timing_end_fallback, args, (size_t)nargs, kwnames);
    }
    TimingObject *timing = (TimingObject *)args[0];
    if (timing->ended) {
        PyErr_SetString(PyExc_RuntimeError, "this timing has ended already");
        return NULL;
    }
    PyObject *status = int_zero; /* StatusCode.UNSET */
    long long end;
    if (now_ns(&end) < 0) {
        return NULL;
    }
    /* The context before it is current again (a timing made current), before anything else
     * can fail: an ended span left current would parent the rest of the task. Ended in
     * another context than it started in (a ValueError), there is nothing to restore. */
    if (timing->token != NULL && PyContextVar_Reset(timing_var, timing->token) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_ValueError)) {
            return NULL;
        }
        PyErr_Clear();
    }
    timing->ended = 1;
    /* Checked after ending, as the Python end_timing does: a bad call drops the span. */
    if (!PyTuple_Check(attributes) || (name != Py_None && !PyUnicode_Check(name))) {
        PyErr_SetString(PyExc_TypeError, BAD_END_TIMING);
        return NULL;
    }
    /* The span's name, when its caller settles it only now (the server span's method). */
    if (name == Py_None) {
        name = timing->name;
    }
    if (timing->pipeline == Py_None) {
        Py_RETURN_NONE;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(attributes);
    PyObject *span = PyTuple_New(13 + n);
    if (span == NULL) {
        return NULL;
    }
    PyObject *kind = PyLong_FromLong(timing->kind);
    PyObject *start = PyLong_FromLongLong(timing->start);
    PyObject *stop = PyLong_FromLongLong(end);
    if (kind == NULL || start == NULL || stop == NULL) {
        Py_XDECREF(kind);
        Py_XDECREF(start);
        Py_XDECREF(stop);
        Py_DECREF(span);
        return NULL;
    }
    /* (name, trace_id, span_id, parent_id, parent_remote, tracestate, kind, start, end,
     *  dropped attributes, events, status, description, *attributes) */
    PyTuple_SET_ITEM(span, 0, Py_NewRef(name));
    PyTuple_SET_ITEM(span, 1, Py_NewRef(timing->trace_id));
    PyTuple_SET_ITEM(span, 2, Py_NewRef(timing->span_id));
    PyTuple_SET_ITEM(span, 3, Py_NewRef(timing->parent_id));
    PyTuple_SET_ITEM(span, 4, Py_NewRef(timing->parent_remote ? Py_True : Py_False));
    PyTuple_SET_ITEM(span, 5, Py_NewRef(timing->tracestate));
    PyTuple_SET_ITEM(span, 6, kind);
    PyTuple_SET_ITEM(span, 7, start);
    PyTuple_SET_ITEM(span, 8, stop);
    PyTuple_SET_ITEM(span, 9, Py_NewRef(int_zero));
    PyTuple_SET_ITEM(span, 10, Py_NewRef(Py_None));
    PyTuple_SET_ITEM(span, 11, Py_NewRef(status));
    PyTuple_SET_ITEM(span, 12, Py_NewRef(Py_None));
    for (Py_ssize_t i = 0; i < n; i++) {
        PyTuple_SET_ITEM(span, 13 + i, Py_NewRef(PyTuple_GET_ITEM(attributes, i)));
    }
    int queued = queue_span(timing->pipeline, span);
    Py_DECREF(span);
    if (queued < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
tracing_switch(PyObject *Py_UNUSED(module), PyObject *pipeline)
{
    Py_CLEAR(timing_pipeline);
    if (pipeline != Py_None) {
        timing_pipeline = Py_NewRef(pipeline);
    }
    Py_RETURN_NONE;
}

static void
put_hex(char *out, unsigned long long value, int digits)
{
    static const char hex_digits[] = "0123456789abcdef";
    for (int i = digits - 1; i >= 0; i--) {
        out[i] = hex_digits[value & 15];
        value >>= 4;
    }
}

/* The low 64 bits of an id (ids are below 2**128 and 2**64: W3C's 32 and 16 hex digits). */
static int
id_bits(PyObject *id, unsigned long long *out)
{
    if (!PyLong_Check(id)) {
        PyErr_SetString(PyExc_TypeError, "a trace context's ids must be ints");
        return -1;
    }
    *out = PyLong_AsUnsignedLongLongMask(id);
    return *out == (unsigned long long)-1 && PyErr_Occurred() ? -1 : 0;
}

/* Remove headers' tracestate, if it has one (0, or -1 with an exception set): a traceparent
 * written without a tracestate of its own must not go with another context's (W3C). A dict
 * costs one lookup when there is none, the common case. */
static int
drop_tracestate(PyObject *headers)
{
    int found = PyDict_CheckExact(headers) ? PyDict_Contains(headers, str_tracestate)
                                           : PySequence_Contains(headers, str_tracestate);
    if (found <= 0) {
        return found;
    }
    return PyObject_DelItem(headers, str_tracestate);
}

/* tracing.inject(headers, span=None): the traceparent (and tracestate) of span, a Timing, or
 * else of the span running now, written into headers, where a tracestate of another context
 * is removed; nothing while tracing is off. */
static PyObject *
inject(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "inject(headers, span=None) takes 1 or 2 arguments");
        return NULL;
    }
    PyObject *headers = args[0], *span = nargs == 2 ? args[1] : Py_None;
    PyObject *context, *trace_id, *span_id_obj, *tracestate;
    int sampled = 1;
    if (span != Py_None) {
        if (timing_pipeline == NULL) { /* tracing off (since the timing started) */
            Py_RETURN_NONE;
        }
        if (!Py_IS_TYPE(span, &Timing_Type)) {
            PyErr_SetString(PyExc_TypeError, "inject's span must be a Timing or None");
            return NULL;
        }
        TimingObject *timing = (TimingObject *)span;
        context = Py_NewRef(span);
        trace_id = timing->trace_id;
        span_id_obj = timing->span_id;
        tracestate = timing->tracestate;
    }
    else {
        context = current_context();
        if (context == NULL) {
            return PyErr_Occurred() ? NULL : Py_NewRef(Py_None);
        }
        trace_id = PyTuple_GET_ITEM(context, 0);
        span_id_obj = PyTuple_GET_ITEM(context, 1);
        tracestate = PyTuple_GET_ITEM(context, 3);
        sampled = PyObject_IsTrue(PyTuple_GET_ITEM(context, 2));
        if (sampled < 0) {
            Py_DECREF(context);
            return NULL;
        }
    }
    PyObject *result = NULL, *text = NULL, *high = NULL;
    unsigned long long trace_low, trace_high, span_id;
    if (id_bits(trace_id, &trace_low) < 0 || id_bits(span_id_obj, &span_id) < 0 ||
        (high = PyNumber_Rshift(trace_id, sixty_four)) == NULL ||
        id_bits(high, &trace_high) < 0) {
        goto done;
    }
    /* "00-" trace id (32 hex digits) "-" span id (16) "-" flags: 55 ASCII characters */
    text = PyUnicode_New(55, 127);
    if (text == NULL) {
        goto done;
    }
    char *out = (char *)PyUnicode_1BYTE_DATA(text);
    memcpy(out, "00-", 3);
    put_hex(out + 3, trace_high, 16);
    put_hex(out + 19, trace_low, 16);
    out[35] = '-';
    put_hex(out + 36, span_id, 16);
    memcpy(out + 52, sampled ? "-01" : "-00", 3);
    if (PyObject_SetItem(headers, str_traceparent, text) < 0) {
        goto done;
    }
    int has_state = PyObject_IsTrue(tracestate);
    if (has_state < 0) {
        goto done;
    }
    int failed = has_state ? PyObject_SetItem(headers, str_tracestate, tracestate)
                           : drop_tracestate(headers);
    if (failed < 0) {
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    Py_XDECREF(high);
    Py_XDECREF(text);
    Py_DECREF(context);
    return result;
}

/* digit_run(data, length): whether ``data`` (any buffer) holds ``length`` ASCII digits in a
 * row; see broker.exactjson, which looks for the integer literals orjson cannot read exactly
 * (a bytes.translate and a substring search there: about four times this loop's time on a
 * small payload). */
static PyObject *
digit_run(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "digit_run(data, length)");
        return NULL;
    }
    Py_ssize_t length = PyLong_AsSsize_t(args[1]);
    if (length == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (length < 1) {
        PyErr_SetString(PyExc_ValueError, "length must be at least 1");
        return NULL;
    }
    Py_buffer data;
    if (PyObject_GetBuffer(args[0], &data, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    const unsigned char *at = (const unsigned char *)data.buf;
    const unsigned char *end = at + data.len;
    Py_ssize_t run = 0;
    int found = 0;
    for (; at < end; at++) {
        if ((unsigned char)(*at - '0') < 10) {
            if (++run == length) {
                found = 1;
                break;
            }
        }
        else {
            run = 0;
        }
    }
    PyBuffer_Release(&data);
    return PyBool_FromLong(found);
}

static PyMethodDef lazy_functions[] = {
    {"digit_run", (PyCFunction)(void (*)(void))digit_run, METH_FASTCALL,
     "digit_run(data, length): whether data holds length ASCII digits in a row (see "
     "broker.exactjson)."},
    {"check_avro", (PyCFunction)(void (*)(void))check_avro, METH_FASTCALL,
     "check_avro(program, payload, max_depth): (offset, reason) of the first integer the "
     "Avro spec does not allow, or None (see broker.codecs._avrocheck)."},
    {"encode_otlp_spans", (PyCFunction)(void (*)(void))encode_otlp_spans, METH_FASTCALL,
     "encode_otlp_spans(spans, fallback): the ScopeSpans.spans fields of finished spans as "
     "OTLP/protobuf; fallback(span) encodes the spans it leaves to Python (see "
     "broker.telemetry._otlp)."},
    {"timing_bind", (PyCFunction)(void (*)(void))timing_bind, METH_FASTCALL,
     "timing_bind(current, TraceContext, getrandbits, end_timing): what the timing functions use "
     "(broker.telemetry.tracing calls it once)."},
    {"start_timing", (PyCFunction)(void (*)(void))start_timing, METH_FASTCALL | METH_KEYWORDS,
     "start_timing(name, kind, parent, trace_id, pipeline, *, current=True): a Timing, made "
     "current as a TraceContext unless current is false (broker.telemetry.tracing.Timing)."},
    {"end_timing", (PyCFunction)(void (*)(void))end_timing, METH_FASTCALL | METH_KEYWORDS,
     "end_timing(timing, attributes=(), *, error=None, failed=False, name=None): "
     "broker.telemetry.tracing.end_timing; a C Timing that neither failed nor raised is ended "
     "here (the context before it current again, its finished span handed to "
     "pipeline.ended), anything else by the Python function bound by timing_bind."},
    {"child_timing", (PyCFunction)(void (*)(void))child_timing, METH_FASTCALL | METH_KEYWORDS,
     "child_timing(name, kind, current=True): a Timing child of the span running now, made "
     "current unless current is false, or None (broker.telemetry.tracing.child_timing)."},
    {"tracing_switch", (PyCFunction)tracing_switch, METH_O,
     "tracing_switch(pipeline): tracing on, its spans ending into pipeline; None: off, and "
     "child_timing and inject do nothing (broker.telemetry.tracing calls it)."},
    {"inject", (PyCFunction)(void (*)(void))inject, METH_FASTCALL,
     "inject(headers, span=None): the traceparent (and tracestate) of span, a Timing, or else "
     "of the current span, written into headers (broker.telemetry.tracing.inject)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef lazy_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "broker.codecs._lazy",
    .m_doc = "C implementation of broker.codecs.lazy.LazyValue and DecodedMessage, of "
             "broker.codecs._avrocheck.check, of the OTLP encoding of finished spans and of "
             "broker.telemetry.tracing.Timing.",
    .m_size = -1,
    .m_methods = lazy_functions,
};

PyMODINIT_FUNC
PyInit__lazy(void)
{
    if (DecodeError == NULL) {
        DecodeError = import_attribute("broker.codecs.base", "DecodeError");
        if (DecodeError == NULL) {
            return NULL;
        }
    }
    if (CONTENT_TYPE == NULL) {
        CONTENT_TYPE = import_attribute("broker.envelope", "CONTENT_TYPE");
        if (CONTENT_TYPE == NULL) {
            return NULL;
        }
    }
    if (stored_schema_id == NULL) {
        stored_schema_id = import_attribute("broker.envelope", "stored_schema_id");
        if (stored_schema_id == NULL) {
            return NULL;
        }
    }
    if ((str_decode == NULL && (str_decode = PyUnicode_InternFromString("decode")) == NULL) ||
        (str_get == NULL && (str_get = PyUnicode_InternFromString("get")) == NULL) ||
        (str_subject == NULL && (str_subject = PyUnicode_InternFromString("subject")) == NULL) ||
        (str_sequence == NULL &&
         (str_sequence = PyUnicode_InternFromString("sequence")) == NULL)) {
        return NULL;
    }
    if ((sixty_four == NULL && (sixty_four = PyLong_FromLong(64)) == NULL) ||
        (two_to_the_64 == NULL &&
         (two_to_the_64 = PyLong_FromString("18446744073709551616", NULL, 10)) == NULL)) {
        return NULL;
    }
    if ((int_zero == NULL && (int_zero = PyLong_FromLong(0)) == NULL) ||
        (int_one == NULL && (int_one = PyLong_FromLong(1)) == NULL) ||
        (str_ended == NULL && (str_ended = PyUnicode_InternFromString("ended")) == NULL) ||
        (str_traceparent == NULL &&
         (str_traceparent = PyUnicode_InternFromString("traceparent")) == NULL) ||
        (str_tracestate == NULL &&
         (str_tracestate = PyUnicode_InternFromString("tracestate")) == NULL) ||
        (str_value_ == NULL && (str_value_ = PyUnicode_InternFromString("_value_")) == NULL) ||
        (str_name == NULL && (str_name = PyUnicode_InternFromString("name")) == NULL) ||
        (str_error == NULL && (str_error = PyUnicode_InternFromString("error")) == NULL) ||
        (str_failed == NULL && (str_failed = PyUnicode_InternFromString("failed")) == NULL) ||
        (str_current == NULL && (str_current = PyUnicode_InternFromString("current")) == NULL) ||
        (str_direct == NULL && (str_direct = PyUnicode_InternFromString("direct")) == NULL) ||
        (str_append == NULL && (str_append = PyUnicode_InternFromString("append")) == NULL) ||
        (str_batch_ready == NULL &&
         (str_batch_ready = PyUnicode_InternFromString("batch_ready")) == NULL) ||
        (empty_tuple == NULL && (empty_tuple = PyTuple_New(0)) == NULL)) {
        return NULL;
    }
    if (PyType_Ready(&LazyValue_Type) < 0 || PyType_Ready(&DecodedMessage_Type) < 0 ||
        PyType_Ready(&Timing_Type) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&lazy_module);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(module, "LazyValue", (PyObject *)&LazyValue_Type) < 0 ||
        PyModule_AddObjectRef(module, "DecodedMessage", (PyObject *)&DecodedMessage_Type) < 0 ||
        PyModule_AddObjectRef(module, "Timing", (PyObject *)&Timing_Type) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
