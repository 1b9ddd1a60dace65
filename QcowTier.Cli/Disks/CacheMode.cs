using QcowTier.Cli.Infrastructure;

namespace QcowTier.Cli.Disks;

/// <summary>
/// QEMU's cache modes (-t/-T): whether the page cache is bypassed (none, directsync), whether every
/// write is flushed (writethrough, directsync), and whether flushes are skipped altogether (unsafe,
/// qemu-img convert's default for its output).
/// </summary>
internal readonly record struct CacheMode(bool Direct, bool WriteThrough, bool NoFlush = false)
{
    public static CacheMode Writeback => new(false, false);

    /// <summary>bdrv_parse_cache_mode; each qemu tool words the error its own way, so the caller says how.</summary>
    public static CacheMode Parse(string? text, string invalidMessage = "Invalid cache mode") => text switch
    {
        null or "writeback" => Writeback,
        "unsafe" => new CacheMode(false, false, NoFlush: true),
        "none" or "off" => new CacheMode(true, false),
        "writethrough" => new CacheMode(false, true),
        "directsync" => new CacheMode(true, true),
        _ => throw new CliException(invalidMessage),
    };
}
