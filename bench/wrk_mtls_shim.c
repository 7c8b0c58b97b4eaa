/*
 * LD_PRELOAD shim that gives stock wrk a TLS client certificate (mTLS).
 *
 * wrk creates one SSL_CTX (ssl_init -> SSL_CTX_new) and never loads a certificate. This shim
 * wraps SSL_CTX_new: it calls the real one (dlsym RTLD_NEXT), then loads the certificate chain
 * and private key named by the environment variables WRK_CLIENT_CERT and WRK_CLIENT_KEY into the
 * new context. SSL_new is wrapped too, as a second chance for a context made some other way
 * (the key is loaded into that SSL object if its context has none). If the files cannot be
 * loaded the shim prints the OpenSSL error and exits 2: a benchmark must not silently run
 * without a client certificate.
 *
 * Built by bench/common.py:  gcc -shared -fPIC -O2 -o wrk_mtls_shim.so wrk_mtls_shim.c -ldl -lssl -lcrypto
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <openssl/err.h>
#include <openssl/ssl.h>

typedef SSL_CTX *(*ctx_new_fn)(const SSL_METHOD *);
typedef SSL *(*ssl_new_fn)(SSL_CTX *);

static void die(const char *what, const char *path) {
    fprintf(stderr, "wrk_mtls_shim: cannot load %s %s\n", what, path ? path : "(unset)");
    ERR_print_errors_fp(stderr);
    exit(2);
}

static void load_into_ctx(SSL_CTX *ctx) {
    const char *cert = getenv("WRK_CLIENT_CERT");
    const char *key = getenv("WRK_CLIENT_KEY");
    if (ctx == NULL || cert == NULL || key == NULL) return;
    if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1) die("certificate chain", cert);
    if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1) die("private key", key);
    if (SSL_CTX_check_private_key(ctx) != 1) die("matching key for", cert);
    if (getenv("WRK_SHIM_VERBOSE")) fprintf(stderr, "wrk_mtls_shim: client certificate %s loaded\n", cert);
}

SSL_CTX *SSL_CTX_new(const SSL_METHOD *method) {
    static ctx_new_fn real = NULL;
    if (real == NULL) real = (ctx_new_fn)dlsym(RTLD_NEXT, "SSL_CTX_new");
    SSL_CTX *ctx = real(method);
    load_into_ctx(ctx);
    return ctx;
}

SSL *SSL_new(SSL_CTX *ctx) {
    static ssl_new_fn real = NULL;
    if (real == NULL) real = (ssl_new_fn)dlsym(RTLD_NEXT, "SSL_new");
    if (ctx != NULL && SSL_CTX_get0_certificate(ctx) == NULL) load_into_ctx(ctx);
    return real(ctx);
}
