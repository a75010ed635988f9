/* The dm-verity level-0 loop of coco.integrity.verity in C: the digest of every block of a
 * buffer, salted, through OpenSSL's EVP interface (the libcrypto Python's hashlib uses).
 * Built at first use by coco.integrity._native with the system compiler; the pure-Python loop
 * stays the fallback and both give the same bytes (tests/integrity/test_verity_native.py).
 * The EVP prototypes are declared here so no OpenSSL headers are needed to build it. */
#include <stddef.h>
#include <string.h>

typedef struct evp_md_st EVP_MD;
typedef struct evp_md_ctx_st EVP_MD_CTX;
const EVP_MD *EVP_get_digestbyname(const char *name);
EVP_MD_CTX *EVP_MD_CTX_new(void);
void EVP_MD_CTX_free(EVP_MD_CTX *ctx);
int EVP_DigestInit_ex(EVP_MD_CTX *ctx, const EVP_MD *type, void *engine);
int EVP_DigestUpdate(EVP_MD_CTX *ctx, const void *d, size_t cnt);
int EVP_DigestFinal_ex(EVP_MD_CTX *ctx, unsigned char *md, unsigned int *s);
int EVP_MD_CTX_copy_ex(EVP_MD_CTX *out, const EVP_MD_CTX *in);

/* SHA-256 without EVP: a plain struct copied per block (the EVP copy costs ~0.5 us a block,
 * a fifth of hashing 4 KiB). The layout is OpenSSL's public SHA256_CTX. */
typedef struct {
    unsigned int h[8];
    unsigned int Nl, Nh;
    unsigned int data[16];
    unsigned int num, md_len;
} SHA256_CTX;
int SHA256_Init(SHA256_CTX *c);
int SHA256_Update(SHA256_CTX *c, const void *data, size_t len);
int SHA256_Final(unsigned char *md, SHA256_CTX *c);

static int sha256_blocks(const unsigned char *buf, size_t bs, size_t count,
                         const unsigned char *salt, size_t saltlen, int salt_first,
                         unsigned char *out)
{
    SHA256_CTX base, ctx;
    size_t i;

    if (!SHA256_Init(&base))
        return -1;
    if (salt_first && saltlen && !SHA256_Update(&base, salt, saltlen))
        return -1;
    for (i = 0; i < count; i++) {
        memcpy(&ctx, &base, sizeof ctx);
        if (!SHA256_Update(&ctx, buf + i * bs, bs))
            return -1;
        if (!salt_first && saltlen && !SHA256_Update(&ctx, salt, saltlen))
            return -1;
        if (!SHA256_Final(out + i * 32, &ctx))
            return -1;
    }
    return 0;
}

/* Hash `count` blocks of `bs` bytes from `buf` into `out` (digest_size bytes each).
 * salt_first: H(salt || block) (verity format 1); else H(block || salt) (format 0).
 * Returns 0, or -1 for an unknown digest or an OpenSSL failure. */
int coco_hash_blocks(const char *name, const unsigned char *buf, size_t bs, size_t count,
                     const unsigned char *salt, size_t saltlen, int salt_first,
                     unsigned char *out, size_t digest_size)
{
    const EVP_MD *md = EVP_get_digestbyname(name);
    EVP_MD_CTX *base, *ctx;
    unsigned int n;
    size_t i;
    int rc = -1;

    if (md == NULL)
        return -1;
    if (strcmp(name, "sha256") == 0 && digest_size == 32)
        return sha256_blocks(buf, bs, count, salt, saltlen, salt_first, out);
    base = EVP_MD_CTX_new();
    ctx = EVP_MD_CTX_new();
    if (base == NULL || ctx == NULL)
        goto done;
    if (!EVP_DigestInit_ex(base, md, NULL))
        goto done;
    if (salt_first && saltlen && !EVP_DigestUpdate(base, salt, saltlen))
        goto done;
    for (i = 0; i < count; i++) {
        if (!EVP_MD_CTX_copy_ex(ctx, base) || !EVP_DigestUpdate(ctx, buf + i * bs, bs))
            goto done;
        if (!salt_first && saltlen && !EVP_DigestUpdate(ctx, salt, saltlen))
            goto done;
        if (!EVP_DigestFinal_ex(ctx, out + i * digest_size, &n) || n != digest_size)
            goto done;
    }
    rc = 0;
done:
    EVP_MD_CTX_free(ctx);
    EVP_MD_CTX_free(base);
    return rc;
}
