using QcowTier.Cli.Disks;
using QcowTier.Cli.Infrastructure;

namespace QcowTier.Cli.Commands;

/// <summary>qemu-img info's backing file fields and --backing-chain.</summary>
internal static class InfoChain
{
    /// <summary>backing-filename, full-backing-filename and backing-filename-format, in ImageInfo's order.</summary>
    public static void AddBacking(Disk disk, QDict d)
    {
        if (disk is not QcowDisk { Image.BackingFile: { } name } q)
        {
            return;
        }
        d.Add("backing-filename", name);
        d.Add("full-backing-filename", q.Image.FullBackingFileName!);
        if (q.Image.BackingFormat is { } fmt)
        {
            d.Add("backing-filename-format", fmt);
        }
    }

    /// <summary>bdrv_image_info_dump's backing lines.</summary>
    public static void PrintBacking(IReadOnlyDictionary<string, object> members, TextWriter w)
    {
        if (!members.TryGetValue("backing-filename", out var name))
        {
            return;
        }
        var full = (string)members["full-backing-filename"];
        w.WriteLine(full == (string)name ? $"backing file: {name}" : $"backing file: {name} (actual path: {full})");
        if (members.TryGetValue("backing-filename-format", out var fmt))
        {
            w.WriteLine($"backing file format: {fmt}");
        }
    }

    /// <summary>Every image of the chain, top first (human: separated by a blank line; json: a list).</summary>
    public static int Run(string path, string? format, bool json, CliContext ctx, Func<Disk, QDict> describe, Action<Disk, QDict, TextWriter> printHuman)
    {
        var seen = new HashSet<string>(StringComparer.Ordinal);
        var infos = new List<QDict>();
        string? next = path;
        var depth = 0;
        while (next is not null)
        {
            if (!seen.Add(next))
            {
                throw new CliException($"Backing file '{next}' creates an infinite loop.");
            }
            if (++depth > QcowImage.MaxBackingDepth + 1)
            {
                throw new CliException($"The backing chain of '{path}' is deeper than {QcowImage.MaxBackingDepth} images");
            }
            using var disk = DiskOpener.Open(next, format, writable: false, noBacking: true);
            var info = describe(disk);
            if (json)
            {
                infos.Add(info);
            }
            else
            {
                if (infos.Count > 0 || depth > 1)
                {
                    ctx.Out.WriteLine();
                }
                printHuman(disk, info, ctx.Out);
            }
            var image = (disk as QcowDisk)?.Image;
            next = image?.FullBackingFileName;
            format = image?.BackingFormat;
        }
        if (json)
        {
            ctx.Out.WriteLine(QDict.ToPrettyJson(infos));
        }
        return 0;
    }
}
