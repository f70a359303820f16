/* A tiny "vulnerable" library: copy_name() trusts a caller-supplied length.
 * The example patch rejects lengths larger than the destination buffer. */
#include <string.h>

#define NAME_MAX_LEN 32

int copy_name(char *dst, const char *src, unsigned len) {
    memcpy(dst, src, len);          /* CVE-like bug: no check of len against NAME_MAX_LEN */
    dst[len < NAME_MAX_LEN ? len : NAME_MAX_LEN - 1] = 0;
    return (int)len;
}
