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

    /// <summary>
    /// Every image of the chain, top first (human: separated by a blank line; json: a list). As qemu-img, the
    /// whole chain is opened before anything is printed, so a missing backing file prints nothing but the error.
    /// </summary>
    public static int Run(string path, string? format, bool json, CliContext ctx, Func<Disk, QDict> describe, Action<Disk, QDict, TextWriter> printHuman)
    {
        var seen = new HashSet<string>(StringComparer.Ordinal);
        var layers = new List<(Disk Disk, QDict Info)>();
        try
        {
            string? next = path;
            while (next is not null)
            {
                if (!seen.Add(next))
                {
                    throw new CliException($"Backing file '{next}' creates an infinite loop.");
                }
                if (layers.Count > QcowImage.MaxBackingDepth)
                {
                    throw new CliException($"The backing chain of '{path}' is deeper than {QcowImage.MaxBackingDepth} images");
                }
                var disk = DiskOpener.Open(next, format, writable: false, noBacking: true);
                layers.Add((disk, describe(disk)));
                var image = (disk as QcowDisk)?.Image;
                next = image?.FullBackingFileName;
                format = image?.BackingFormat;
            }
            if (json)
            {
                ctx.Out.WriteLine(QDict.ToPrettyJson(layers.Select(l => l.Info).ToList()));
                return 0;
            }
            for (var i = 0; i < layers.Count; i++)
            {
                if (i > 0)
                {
                    ctx.Out.WriteLine();
                }
                printHuman(layers[i].Disk, layers[i].Info, ctx.Out);
            }
            return 0;
        }
        finally
        {
            foreach (var (disk, _) in layers)
            {
                disk.Dispose();
            }
        }
    }
}
