/* libhello: a tiny library with a classic bug. copy_name() trusts a caller-supplied length
 * and copies it into a 32-byte field, so a 33-byte name overwrites whatever follows the
 * field. The example patch (patch.toml.in) rejects lengths above 32. */
#include <string.h>

#define NAME_LEN 32

int copy_name(char *dst, const char *src, unsigned len) {
    memcpy(dst, src, len);                        /* BUG: len is not checked */
    dst[len < NAME_LEN ? len : NAME_LEN - 1] = 0;
    return (int)len;
}
