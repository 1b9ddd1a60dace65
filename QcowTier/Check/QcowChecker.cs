using QcowTier.Format;
using QcowTier.Storage;

namespace QcowTier.Check;

/// <summary>
/// qemu-img check for qcow2: walks every structure that references clusters, compares with the
/// refcounts on disk, and repairs leaks (<see cref="QcowRepairMode.Leaks"/>) or everything it can
/// (<see cref="QcowRepairMode.All"/>). Runs with the engine's metadata flushed and its lock held;
/// the engine reloads its caches when anything was fixed.
/// </summary>
internal static class QcowChecker
{
    /// <param name="file">The image (the primary file of a tiered image); repairs write only here.</param>
    /// <param name="header">Its parsed header; updated when a repair moves the refcount table.</param>
    /// <param name="mode">What to repair.</param>
    /// <param name="tierFile">The HDD data file of a tiered image (its length bounds the HDD clusters); null otherwise.</param>
    public static QcowCheckResult Run(ImageStorage file, QcowHeader header, QcowRepairMode mode, ImageStorage? tierFile = null)
    {
        ArgumentNullException.ThrowIfNull(file);
        ArgumentNullException.ThrowIfNull(header);
        if (mode != QcowRepairMode.None && !file.CanWrite)
        {
            ThrowHelper.ReadOnly(file.Name);
        }
        var log = new CheckLog();
        var pass = new CheckPass(file, header, mode, log, tierFile);
        pass.Execute();
        var first = pass.Totals;
        if (mode != QcowRepairMode.None && !pass.Failed && (first.CorruptionsFixed > 0 || first.LeaksFixed > 0))
        {
            // As qemu-img: what is reported is a fresh read-only check of the repaired image, plus what was fixed.
            log.Add("The following inconsistencies were found and repaired:");
            log.Add("");
            log.Add($"    {first.LeaksFixed} leaked clusters");
            log.Add($"    {first.CorruptionsFixed} corruptions");
            log.Add("");
            log.Add("Double checking the fixed image now...");
            pass = new CheckPass(file, header, QcowRepairMode.None, log, tierFile);
            pass.Execute();
        }
        var totals = pass.Totals;
        return new QcowCheckResult
        {
            Corruptions = totals.Corruptions,
            Leaks = totals.Leaks,
            CheckErrors = totals.CheckErrors,
            CorruptionsFixed = first.CorruptionsFixed,
            LeaksFixed = first.LeaksFixed,
            ImageEndOffset = pass.ImageEndOffset,
            TotalClusters = pass.TotalClusters,
            AllocatedClusters = pass.AllocatedClusters,
            FragmentedClusters = pass.FragmentedClusters,
            CompressedClusters = pass.CompressedClusters,
            Messages = log.ToList(),
        };
    }
}
