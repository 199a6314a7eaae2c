// The stamp of the op schemas this library was built against: FASTREG_SCHEMA_DIGEST, the digest of
// fastreg/_schemas.py (hex digits, passed unquoted) that setup.py, tools/dev_build.py and CMakeLists.txt
// define (tools/build_env.py). fastreg/_registry.py looks for it in the file before loading the library:
// registering kernels for schemas that have since changed throws while the library's static
// initialisers run, which nothing can catch (std::terminate), so a stale build would otherwise abort
// `import fastreg`.
#ifndef FASTREG_SCHEMA_DIGEST
#error "build with -DFASTREG_SCHEMA_DIGEST=<digest> (see tools/build_env.py)"
#endif

#define FASTREG_STRINGIFY_(x) #x
#define FASTREG_STRINGIFY(x) FASTREG_STRINGIFY_(x)

extern "C" __attribute__((used, visibility("default"))) const char fastreg_schema_stamp[] =
    "fastreg-schema-digest:" FASTREG_STRINGIFY(FASTREG_SCHEMA_DIGEST) ";";
